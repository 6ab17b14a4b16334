"""``2:4``: values [N, K/2] + meta [N, ceil(K/8)] uint8, 1.125 bytes per weight at fp16.

On CUDA, at ``SEMI_STRUCTURED_MIN_M`` rows of x and above (compute-bound prefill), the matmul
runs torch's semi-structured sparsity (cuSPARSELt / CUTLASS sparse tensor cores) where dtype and
shape allow; below it the Triton ``sparse24_mm`` (weight-stream bound decode; Triton has no
sparse MMA). On the CPU the kernel op takes its C++ path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sparsekit.kernels import compress_24, decompress_24, sparse24_mm
from sparsekit.kernels.sparse24 import check_24_layout
from sparsekit.kernels.sparse24_cpu import bind_sparse24_cpu

from .base import TensorSpec, WeightFormat, register

SEMI_STRUCTURED_MIN_M = 128


def is_24(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 nonzeros."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def semi_structured_ok(values: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether torch's sparse tensor cores can take this weight (CUDA sm80+, fp16/bf16, whole tiles)."""
    if not values.is_cuda or values.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(values.device) < (8, 0):
        return False
    # cuSPARSELt / CUTLASS need the sparse operand in whole 32-row x 64-column tiles
    return out_features % 64 == 0 and in_features % 64 == 0


@register
class Sparse24(WeightFormat):
    name = "2:4"
    structured = True

    def layout(self, out_features: int, in_features: int, nnz: int = 0) -> list[TensorSpec]:
        return [
            TensorSpec("values", (out_features, in_features // 2)),
            TensorSpec("meta", (out_features, (in_features + 7) // 8), torch.uint8),
        ]

    def check_shape(self, out_features: int, in_features: int) -> None:
        if in_features % 4:
            raise ValueError(f"2:4 needs in_features % 4 == 0, got {in_features}; use format='bitmap'")

    def fits(self, weight: torch.Tensor) -> bool:
        return is_24(weight)

    def check_contents(self, t: Any, out_features: int, in_features: int, where: str) -> None:
        """Every group's nibble holds two distinct kept positions, ascending (i0 < i1)."""
        groups = in_features // 4
        nib = torch.stack((t.meta & 15, t.meta >> 4), dim=-1).reshape(out_features, -1)[:, :groups]
        bad = (nib & 3) >= (nib >> 2)
        if bool(bad.any()):
            row, group = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{where}.meta: row {row}, group {group} has kept positions {int(nib[row, group] & 3)} and "
                f"{int(nib[row, group] >> 2)}; 2:4 positions must be distinct and ascending. The file is "
                "damaged: save the model again"
            )

    def compress(self, weight, mask):
        values, meta = compress_24(weight.contiguous())
        return {"values": values, "meta": meta}

    def to_dense(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        return decompress_24(t.values, t.meta)

    def wants_semi_structured(self, t: Any, rows: int) -> bool:
        """Whether an ``auto`` forward with ``rows`` rows of x runs on sparse tensor cores."""
        return (
            rows >= SEMI_STRUCTURED_MIN_M
            and t.values.is_cuda
            and not torch.compiler.is_compiling()
            and semi_structured_ok(t.values, t.values.shape[0], 2 * t.values.shape[1])
        )

    def semi_structured_matmul(self, t: Any, x: torch.Tensor, bias: torch.Tensor | None, cache: dict):
        """x @ W.T + bias on torch's sparse tensor cores; the converted weight is kept in ``cache``."""
        if "semi" not in cache:
            cache["semi"] = torch.sparse.to_sparse_semi_structured(decompress_24(t.values, t.meta))
        n, k = t.values.shape[0], 2 * t.values.shape[1]
        y = F.linear(x.reshape(-1, k), cache["semi"], bias)
        return y.reshape(*x.shape[:-1], n)

    def bind_cpu(self, t: Any, isa=None):
        if t.values.device.type != "cpu" or t.values.requires_grad:
            return None
        check_24_layout(t.values, t.meta)
        return bind_sparse24_cpu(t.values.contiguous(), t.meta.contiguous(), isa=isa)

    def matmul(self, t, x, bias, backend):
        return sparse24_mm(x, t.values, t.meta, bias, backend=backend)
