"""Orchestration of fiqa-curator: the command line (`cli`) and the jobs it runs.

Flows wire the `workers` package (model, preprocessing, scoring); nothing here is imported by `workers`.
"""
