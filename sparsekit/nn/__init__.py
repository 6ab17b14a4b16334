"""torch modules over the kernel layer: SparseLinear and the model-level swap (no transformers here)."""

from .sparse_linear import FORMATS, SparseLinear, choose_format, is_24
from .sparsify import SparsifyReport, densify, set_format, sparsify

__all__ = [
    "FORMATS",
    "SparseLinear",
    "SparsifyReport",
    "choose_format",
    "densify",
    "is_24",
    "set_format",
    "sparsify",
]
