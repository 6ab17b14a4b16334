"""``masked``: weight [N, K] (a trainable Parameter, zeros kept) + mask_bits [N, ceil(K/8)] uint8.

For sparse fine-tuning: ``masked_mm``'s weight gradient is zero at pruned entries, so the mask
survives any optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsekit.kernels import masked_mm, pack_mask, unpack_mask

from .base import TensorSpec, WeightFormat, register


@register
class Masked(WeightFormat):
    name = "masked"
    trainable = True

    def layout(self, out_features: int, in_features: int, nnz: int = 0) -> list[TensorSpec]:
        return [
            TensorSpec("weight", (out_features, in_features), parameter=True),
            TensorSpec("mask_bits", (out_features, (in_features + 7) // 8), torch.uint8),
        ]

    def compress(self, weight, mask):
        keep = mask.to(weight.device) if mask is not None else weight != 0
        return {"weight": weight.contiguous().clone(), "mask_bits": pack_mask(keep)}

    def to_dense(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return t.weight * self.mask(t, out_features, in_features).to(t.weight.dtype)

    def mask(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return unpack_mask(t.mask_bits, (out_features, in_features))

    def matmul(self, t, x, bias, backend):
        return masked_mm(x, t.weight, t.mask_bits, bias, backend=backend)
