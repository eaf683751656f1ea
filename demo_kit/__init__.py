"""The demonstration kit: a sample dataset built from face photographs that ship inside installed
packages, a utility target from a real face-recognition model, and the training of the small demo
ViT-FIQA model that the embedded default job uses.

faces      the source photographs (with provenance and licence), aligned to the ArcFace template
degrade    graded, seeded degradations of an aligned face
utility    dlib's face-recognition model and the utility target derived from it
build      the sample dataset: images, manifest, pairs (`fiqa demo-data`)
train      training and held-out evaluation of the demo model (`python -m fiqa_curator.demo_kit.train`)
"""
