"""CPU path of the bitmap GEMM: C++ kernels for every x86-64 ISA level (``cpu_ext``), no
whole-matrix decompression per call.

``bitmap_mm_cpu``: x [..., K] (fp32/bf16/fp16), values [nnz], mask_bits [N, ceil(K/8)] uint8,
offsets [N, ceil(K/64)] int32 (``compress_bitmap``), bias [N] or None -> y [..., N] =
x @ W.T + bias, fp32 accumulation.

Decode and small batches (M <= ``cpu_ext.DIRECT_MAX_M``): the direct kernel walks each weight
row's mask once, expands its values into dense vectors in registers (AVX-512: vexpandps per 16
columns; AVX2: a per-byte permute table, 8 columns; scalar: the set bits; AVX-512 + BF16, bf16:
vpexpandw per 32 columns, then one vdpbf16ps per row of x, x read as bf16) and multiplies them
with every row of x: it reads s * b + 1/8 bytes per weight (s kept fraction, b value bytes).
Larger M: decompressed tiles of weight rows + ATen's GEMM, tiles spread over threads (the blas
path of ``sparse24_cpu``). Without the extension: whole-matrix decompress + F.linear.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_ext
from ._backend import CpuIsa
from .cpu_ext import choose_path, extension, isa_level, resolve_isa
from .mask_bits import unpack_bits


def _decompress_torch(values, mask_bits, in_features: int) -> torch.Tensor:
    mask = unpack_bits(mask_bits, in_features)
    return values.new_zeros(mask.shape).masked_scatter_(mask, values)


def decompress_bitmap_cpu(
    values: torch.Tensor,
    mask_bits: torch.Tensor,
    offsets: torch.Tensor,
    in_features: int,
    isa: CpuIsa | str | None = None,
) -> torch.Tensor:
    """(values [nnz], mask_bits [N, ceil(K/8)], offsets [N, ceil(K/64)]) -> dense [N, K] with zeros
    (format already checked by the caller)."""
    ext = extension()
    if ext is None:
        return _decompress_torch(values, mask_bits, in_features)
    values, mask_bits, offsets = values.contiguous(), mask_bits.contiguous(), offsets.contiguous()
    out = values.new_empty(mask_bits.shape[0], in_features)
    ext.decompress_bitmap_rows(values, mask_bits, offsets, 0, out, isa_level(resolve_isa(isa)))
    return out


def bitmap_mm_cpu(
    x: torch.Tensor,
    values: torch.Tensor,
    mask_bits: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    isa: CpuIsa | str | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """CPU bitmap GEMM (inputs already checked by ``bitmap_mm``).

    ``isa``: None follows ``use_cpu_isa`` / SPARSEKIT_CPU_ISA; ``path``: 'auto' (by M, see
    ``cpu_ext.DIRECT_MAX_M``), 'direct' or 'blas'.
    """
    k, n = x.shape[-1], mask_bits.shape[0]
    ext = extension()
    if ext is None:
        return F.linear(x, _decompress_torch(values, mask_bits, k), bias)
    x2 = x.reshape(-1, k).contiguous()
    chosen = resolve_isa(isa)
    route = choose_path("bitmap", chosen, x.dtype, x2.shape[0], path)
    values, mask_bits, offsets = values.contiguous(), mask_bits.contiguous(), offsets.contiguous()
    b = bias.contiguous() if bias is not None else None
    y = ext.mm_bitmap(x2, values, mask_bits, offsets, b, isa_level(chosen), route, cpu_ext.BLAS_TILE_BYTES)
    return y.reshape(*x.shape[:-1], n)


def bind_bitmap_cpu(
    values: torch.Tensor,
    mask_bits: torch.Tensor,
    offsets: torch.Tensor,
    in_features: int,
    isa: CpuIsa | str | None = None,
) -> Callable[..., torch.Tensor]:
    """``fn(x, bias) -> y``: the CPU bitmap GEMM of one stored weight, checks and ISA fixed now
    (the eager ``SparseLinear`` hot path, as ``bind_sparse24_cpu``)."""
    tensors = (values, mask_bits, offsets)
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        raise ValueError("bind_bitmap_cpu needs contiguous CPU values, mask_bits and offsets")
    k = in_features
    ext = extension()
    if ext is None:
        return lambda x, bias: F.linear(x, _decompress_torch(values, mask_bits, k), bias)
    level, most, tile = cpu_ext.route_args("bitmap", values.dtype, k, isa=isa)

    def mm(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x [..., K] as it comes: the C++ entry flattens it and gives y its leading dims
        return ext.mm_bitmap(x, values, mask_bits, offsets, bias, level, int(x.numel() > most), tile)

    return mm


__all__ = ["bind_bitmap_cpu", "bitmap_mm_cpu", "decompress_bitmap_cpu"]
