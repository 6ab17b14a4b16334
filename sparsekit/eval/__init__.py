"""Evaluation: perplexity."""

from .perplexity import PerplexityResult, perplexity, perplexity_of_ids

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_ids"]
