"""Evaluation of quality scores against face-recognition outcomes: Error-versus-Discard curves and pAUC.

`edc` implements both protocols described in shared/docs/VITFIQA.md, vectorised: `erc` (the CR-FIQA /
ViT-FIQA / EX-FIQA papers' protocol) and `iso` (Schlett et al., ISO/IEC 29794-1 style FNM-EDC). It depends
on numpy only; flows wire it to quality tables and embeddings.
"""
