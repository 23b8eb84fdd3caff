"""Experiments built on the trainer: arm comparisons (compare) and their tables and figures (report)."""
