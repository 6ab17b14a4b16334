"""Evaluation: perplexity, and zero-shot accuracy through lm-evaluation-harness (optional extra)."""

from .perplexity import PerplexityResult, perplexity, perplexity_of_ids

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_ids"]
