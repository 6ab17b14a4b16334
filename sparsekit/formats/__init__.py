"""Sparsity patterns and masks (above the kernels, below the pruning algorithms)."""

from .masks import check_mask, mask_sparsity, pattern_mask
from .patterns import NMPattern, Pattern, Unstructured, parse_sparsity

__all__ = [
    "NMPattern",
    "Pattern",
    "Unstructured",
    "check_mask",
    "mask_sparsity",
    "parse_sparsity",
    "pattern_mask",
]
