"""Weight formats: how a pruned weight is stored and multiplied (one file each, registered by name)."""

from .base import TensorSpec, WeightFormat, choose_format, format_names, register, weight_format
from .bitmap import Bitmap

# registration: importing a format's module registers it
from .dense import Dense
from .masked import Masked
from .quantized import Int4, Int8, Sparse24Int8
from .sparse24 import SEMI_STRUCTURED_MIN_M, Sparse24, is_24, semi_structured_ok

__all__ = [
    "SEMI_STRUCTURED_MIN_M",
    "Bitmap",
    "Dense",
    "Int4",
    "Int8",
    "Masked",
    "Sparse24",
    "Sparse24Int8",
    "TensorSpec",
    "WeightFormat",
    "choose_format",
    "format_names",
    "is_24",
    "register",
    "semi_structured_ok",
    "weight_format",
]
