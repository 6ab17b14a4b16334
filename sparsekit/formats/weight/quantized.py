"""Weight-only quantized formats: ``int8`` (per row), ``int4`` (per group of inputs) and
``2:4-int8`` (2:4 with int8 values). Lossy: each reproduces F.linear(x, to_dense()), where
to_dense() is the dequantized weight, never the float weight it came from.

  int8       qweight int8 [N, K] + scale [N]                   1 byte per weight (+ 2-4 per row)
  int4-gG    qweight uint8 [N, K/2] + scale_zero [K/G, N, 2]   0.5 byte per weight (+ 4-8 per G)
  2:4-int8   values int8 [N, K/2] + meta uint8 [N, ceil(K/8)]  0.625 byte per weight (+ 2-4 per row)
             + scale [N]

CPU forwards: torch's packed int8 / int4 weight-only ops and sparsekit's C++ 2:4 + int8 kernel
(``sparsekit.kernels.quant``); other devices dequantize per call. int4's default group is 64
(``int4``; ``int4-g32``, ``int4-g128``, ``int4-g256`` too): 128, torchao's default, does not divide
SmolLM2's 576 inputs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from sparsekit.kernels import Backend, compress_24, decompress_24
from sparsekit.kernels.quant import (
    INT4_GROUPS,
    bind_int4_cpu,
    bind_int8_cpu,
    bind_sparse24_int8_cpu,
    check_int4_shape,
    dequantize_int4,
    dequantize_int8,
    int4_mm,
    int8_mm,
    quantize_int4,
    quantize_int8,
    sparse24_int8_mm,
)

from .base import TensorSpec, WeightFormat, register, weight_format
from .sparse24 import is_24


def _no_triton(name: str, backend: Backend | None) -> None:
    if backend is Backend.TRITON:
        raise ValueError(f"the {name} format has no Triton kernel; use backend='auto' or 'torch'")


@register
class Int8(WeightFormat):
    name = "int8"
    lossy = True

    def layout(self, out_features: int, in_features: int, nnz: int = 0) -> list[TensorSpec]:
        return [
            TensorSpec("qweight", (out_features, in_features), torch.int8),
            TensorSpec("scale", (out_features,)),
        ]

    def compress(self, weight, mask):
        q, scale = quantize_int8(weight)
        return {"qweight": q, "scale": scale}

    def to_dense(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return dequantize_int8(t.qweight, t.scale)

    def bind_cpu(self, t: Any, isa=None):
        if t.qweight.device.type != "cpu" or t.scale.requires_grad:
            return None
        return bind_int8_cpu(t.qweight.contiguous(), t.scale.contiguous(), isa=isa)

    def matmul(self, t, x, bias, backend):
        _no_triton(self.name, backend)
        return int8_mm(x, t.qweight, t.scale, bias)


@register
class Int4(WeightFormat):
    name = "int4"
    lossy = True
    group: ClassVar[int] = 64

    def layout(self, out_features: int, in_features: int, nnz: int = 0) -> list[TensorSpec]:
        return [
            TensorSpec("qweight", (out_features, in_features // 2), torch.uint8),
            TensorSpec("scale_zero", (in_features // self.group, out_features, 2)),
        ]

    def check_shape(self, out_features: int, in_features: int) -> None:
        check_int4_shape(in_features, self.group)

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.shape[1] % self.group == 0

    def compress(self, weight, mask):
        packed, scale_zero = quantize_int4(weight, self.group)
        return {"qweight": packed, "scale_zero": scale_zero}

    def to_dense(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return dequantize_int4(t.qweight, t.scale_zero)

    def bind_cpu(self, t: Any, isa=None):
        if t.qweight.device.type != "cpu" or t.scale_zero.requires_grad:
            return None
        return bind_int4_cpu(t.qweight.contiguous(), t.scale_zero, isa=isa)

    def matmul(self, t, x, bias, backend):
        _no_triton(self.name, backend)
        return int4_mm(x, t.qweight, t.scale_zero, bias)


for _group in INT4_GROUPS:
    if _group != Int4.group:
        register(type(f"Int4G{_group}", (Int4,), {"name": f"int4-g{_group}", "group": _group}))


@register
class Sparse24Int8(WeightFormat):
    name = "2:4-int8"
    lossy = True

    def layout(self, out_features: int, in_features: int, nnz: int = 0) -> list[TensorSpec]:
        return [
            TensorSpec("values", (out_features, in_features // 2), torch.int8),
            TensorSpec("meta", (out_features, (in_features + 7) // 8), torch.uint8),
            TensorSpec("scale", (out_features,)),
        ]

    def check_shape(self, out_features: int, in_features: int) -> None:
        weight_format("2:4").check_shape(out_features, in_features)

    def fits(self, weight: torch.Tensor) -> bool:
        return is_24(weight)

    def check_contents(self, t: Any, out_features: int, in_features: int, where: str) -> None:
        weight_format("2:4").check_contents(t, out_features, in_features, where)

    def compress(self, weight, mask):
        values, meta = compress_24(weight.contiguous())
        q, scale = quantize_int8(values)  # per row: max |kept value| / 127
        return {"values": q, "meta": meta, "scale": scale}

    def to_dense(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return decompress_24(dequantize_int8(t.values, t.scale), t.meta)

    def mask(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return decompress_24(torch.ones_like(t.values, dtype=torch.float32), t.meta) != 0

    def bind_cpu(self, t: Any, isa=None):
        if t.values.device.type != "cpu" or t.scale.requires_grad:
            return None
        return bind_sparse24_int8_cpu(t.values.contiguous(), t.meta.contiguous(), t.scale, isa=isa)

    def matmul(self, t, x, bias, backend):
        _no_triton(self.name, backend)
        return sparse24_int8_mm(x, t.values, t.meta, t.scale, bias)
