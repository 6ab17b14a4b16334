"""``bitmap``: any unstructured mask. values [nnz] + mask_bits [N, ceil(K/8)] uint8 + offsets
[N, ceil(K/64)] int32 (index in values of each 64-column tile's first kept weight)."""

from __future__ import annotations

from typing import Any

import torch

from sparsekit.kernels import bitmap_mm, compress_bitmap, decompress_bitmap, unpack_mask
from sparsekit.kernels.bitmap import check_format
from sparsekit.kernels.bitmap_cpu import bind_bitmap_cpu
from sparsekit.kernels.mask_bits import unpack_bits

from .base import TensorSpec, WeightFormat, register

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


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

    def check_contents(self, t: Any, out_features: int, in_features: int, where: str) -> None:
        """Set bits (padding included) == len(values), and offsets == the running count per tile."""
        fix = "The file is damaged: save the model again"
        set_bits = int(_POPCOUNT.to(t.mask_bits.device)[t.mask_bits.long()].sum())
        mask = unpack_bits(t.mask_bits, in_features)
        if set_bits != int(mask.sum()):
            raise ValueError(f"{where}.mask_bits has bits set past in_features={in_features}. {fix}")
        if set_bits != t.values.numel():
            raise ValueError(
                f"{where}: mask_bits has {set_bits} set bits but values holds {t.values.numel()} "
                f"entries. {fix}"
            )
        tiles = t.offsets.shape[1]
        counts = (
            torch.nn.functional.pad(mask, (0, tiles * 64 - in_features)).view(out_features, tiles, 64).sum(-1)
        )
        ends = counts.reshape(-1).cumsum(0)
        expected = (ends - counts.reshape(-1)).view(out_features, tiles)
        if not torch.equal(expected.to(t.offsets.dtype), t.offsets):
            row = int((expected.to(t.offsets.dtype) != t.offsets).any(1).nonzero()[0])
            raise ValueError(f"{where}.offsets (row {row}) do not match mask_bits. {fix}")

    def mask(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return unpack_mask(t.mask_bits, (out_features, in_features))

    def nnz(self, t: Any, out_features: int, in_features: int) -> int:
        return t.values.numel()

    def stored_nnz(self, t: Any) -> int:
        values = getattr(t, "values", None)
        return values.numel() if values is not None else 0

    def bind_cpu(self, t: Any, isa=None):
        if t.values.device.type != "cpu" or t.values.requires_grad:
            return None
        in_features = t.in_features
        check_format(t.values, t.mask_bits, t.offsets, in_features)
        tensors = (t.values.contiguous(), t.mask_bits.contiguous(), t.offsets.contiguous())
        return bind_bitmap_cpu(*tensors, in_features, isa=isa)

    def matmul(self, t, x, bias, backend):
        return bitmap_mm(x, t.values, t.mask_bits, t.offsets, bias, backend=backend)
