"""torch modules over the kernel layer: SparseLinear and the model-level swap (no transformers here)."""

from sparsekit.formats.weight import WeightFormat, choose_format, format_names, is_24, weight_format

from .sparse_linear import SparseLinear
from .sparsify import QUANT_FORMATS, SparsifyReport, densify, quantize, quantize_head, set_format, sparsify

__all__ = [
    "QUANT_FORMATS",
    "SparseLinear",
    "SparsifyReport",
    "WeightFormat",
    "choose_format",
    "densify",
    "format_names",
    "is_24",
    "quantize",
    "quantize_head",
    "set_format",
    "sparsify",
    "weight_format",
]
