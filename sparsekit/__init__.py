"""sparsekit: one-shot LLM pruning with kernels that make the pruned model smaller and faster."""

from .api import perplexity, prune
from .formats import NMPattern, Unstructured, parse_sparsity
from .hf.checkpoint import export_dense, load, save
from .hf.finetune import finetune
from .hf.quantizer import register_with_transformers
from .nn import SparseLinear, sparsify
from .pruning import (
    PruneConfig,
    PruneReport,
    magnitude_prune,
    prune_model,
    sparsegpt_prune,
    wanda_prune,
)

__version__ = "0.1.0"

register_with_transformers()  # from_pretrained of a sparsekit checkpoint builds SparseLinear layers

__all__ = [
    "NMPattern",
    "PruneConfig",
    "PruneReport",
    "SparseLinear",
    "Unstructured",
    "export_dense",
    "finetune",
    "load",
    "magnitude_prune",
    "parse_sparsity",
    "perplexity",
    "prune",
    "prune_model",
    "save",
    "sparsegpt_prune",
    "sparsify",
    "wanda_prune",
]
