"""``dense``: W [N, K] as one Parameter, zeros kept: the reference every format must reproduce."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import TensorSpec, WeightFormat, register


@register
class Dense(WeightFormat):
    name = "dense"

    def layout(self, out_features: int, in_features: int, nnz: int = 0) -> list[TensorSpec]:
        return [TensorSpec("weight", (out_features, in_features), parameter=True)]

    def compress(self, weight, mask):
        return {"weight": weight.contiguous().clone()}

    def to_dense(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return t.weight

    def matmul(self, t, x, bias, backend):
        return F.linear(x, t.weight, bias)
