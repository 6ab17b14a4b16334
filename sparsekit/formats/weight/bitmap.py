"""``bitmap``: any unstructured mask. values [nnz] + mask_bits [N, ceil(K/8)] uint8 + offsets
[N, ceil(K/64)] int32 (index in values of each 64-column tile's first kept weight)."""

from __future__ import annotations

from typing import Any

import torch

from sparsekit.kernels import bitmap_mm, compress_bitmap, decompress_bitmap, unpack_mask

from .base import TensorSpec, WeightFormat, register


@register
class Bitmap(WeightFormat):
    name = "bitmap"

    def layout(self, out_features: int, in_features: int, nnz: int = 0) -> list[TensorSpec]:
        return [
            TensorSpec("values", (nnz,)),
            TensorSpec("mask_bits", (out_features, (in_features + 7) // 8), torch.uint8),
            TensorSpec("offsets", (out_features, (in_features + 63) // 64), torch.int32),
        ]

    def compress(self, weight, mask):
        values, mask_bits, offsets = compress_bitmap(weight.contiguous())
        return {"values": values, "mask_bits": mask_bits, "offsets": offsets}

    def to_dense(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return decompress_bitmap(t.values, t.mask_bits, t.offsets, in_features)

    def mask(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return unpack_mask(t.mask_bits, (out_features, in_features))

    def nnz(self, t: Any, out_features: int, in_features: int) -> int:
        return t.values.numel()

    def stored_nnz(self, t: Any) -> int:
        values = getattr(t, "values", None)
        return values.numel() if values is not None else 0

    def matmul(self, t, x, bias, backend):
        return bitmap_mm(x, t.values, t.mask_bits, t.offsets, bias, backend=backend)
