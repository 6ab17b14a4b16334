"""Pruning algorithms (tensors in, tensors out), the method objects and the layer-sequential engine."""

from sparsekit.models import UnsupportedArchitecture, find_decoder_blocks

from .allocation import OWL, Allocation, Uniform, outlier_ratio
from .compose import (
    ADMMUpdate,
    DSnoT,
    MaskRefine,
    NoRefine,
    NoUpdate,
    SparseGPTUpdate,
    WeightUpdate,
    mask_refine,
    weight_update,
)
from .engine import PASSES, LayerReport, PruneConfig, PruneReport, prune_model

# registration: importing a method's module registers it
from .magnitude import Magnitude, magnitude_prune
from .method import (
    LayerResult,
    PruningMethod,
    Statistic,
    method_names,
    pruning_method,
    register_method,
)
from .ria import RIA, ria_prune, ria_scores
from .sparsegpt import (
    FACTOR_SOLVER,
    PLAIN_SOLVER,
    HessianNotPositiveDefinite,
    QuantGrid,
    SparseGPT,
    sparsegpt_prune,
    sparsegpt_prune_ref,
    sparsegpt_solve,
)
from .wanda import Wanda, wanda_prune

__all__ = [
    "ADMMUpdate",
    "DSnoT",
    "MaskRefine",
    "NoRefine",
    "QuantGrid",
    "NoUpdate",
    "SparseGPTUpdate",
    "WeightUpdate",
    "mask_refine",
    "weight_update",
    "OWL",
    "RIA",
    "Allocation",
    "Uniform",
    "outlier_ratio",
    "ria_prune",
    "ria_scores",
    "FACTOR_SOLVER",
    "PLAIN_SOLVER",
    "HessianNotPositiveDefinite",
    "LayerReport",
    "LayerResult",
    "Magnitude",
    "PASSES",
    "PruneConfig",
    "PruneReport",
    "PruningMethod",
    "SparseGPT",
    "Statistic",
    "UnsupportedArchitecture",
    "Wanda",
    "find_decoder_blocks",
    "magnitude_prune",
    "method_names",
    "prune_model",
    "pruning_method",
    "register_method",
    "sparsegpt_prune",
    "sparsegpt_prune_ref",
    "sparsegpt_solve",
    "wanda_prune",
]
