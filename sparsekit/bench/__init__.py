"""Benchmarks and the demo: quality (perplexity), per-layer and end-to-end speed, reports."""
