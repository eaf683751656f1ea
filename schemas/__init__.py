"""Parquet schemas of fiqa-curator's tables (quality table, curation lists), declared once, versioned.

Empty until the scoring pipeline lands; `workers` never imports from here.
"""
