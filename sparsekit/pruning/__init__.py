"""Pruning algorithms (tensors in, tensors out) and the layer-sequential engine."""

from sparsekit.arch import SUPPORTED_MODEL_TYPES, UnsupportedArchitecture, find_decoder_blocks

from .engine import METHODS, LayerReport, PruneConfig, PruneReport, prune_model
from .magnitude import magnitude_prune
from .sparsegpt import HessianNotPositiveDefinite, sparsegpt_prune, sparsegpt_prune_ref, sparsegpt_solve
from .wanda import wanda_prune

__all__ = [
    "METHODS",
    "SUPPORTED_MODEL_TYPES",
    "HessianNotPositiveDefinite",
    "LayerReport",
    "PruneConfig",
    "PruneReport",
    "UnsupportedArchitecture",
    "find_decoder_blocks",
    "magnitude_prune",
    "prune_model",
    "sparsegpt_prune",
    "sparsegpt_prune_ref",
    "sparsegpt_solve",
    "wanda_prune",
]
