"""Outcome verifiers (math, code), their host pool, and the implicit process reward model."""
