"""Evaluation: retrieval fidelity, decode-mode perplexity, synthetic long-context tasks,
LongBench and its metrics. Imports every other folder; nothing imports it but the entry points."""
