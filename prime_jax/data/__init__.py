"""Datasets: Eurus-2-RL-Data schema readers, prompt templates, benchmarks, synthetic tasks."""
