"""sparsekit: one-shot LLM pruning with kernels that make the pruned model smaller and faster."""

from .api import perplexity, prune
from .formats import NMPattern, Unstructured, parse_sparsity
from .pruning import (
    PruneConfig,
    PruneReport,
    magnitude_prune,
    prune_model,
    sparsegpt_prune,
    wanda_prune,
)

__version__ = "0.1.0"

__all__ = [
    "NMPattern",
    "PruneConfig",
    "PruneReport",
    "Unstructured",
    "magnitude_prune",
    "parse_sparsity",
    "perplexity",
    "prune",
    "prune_model",
    "sparsegpt_prune",
    "wanda_prune",
]
