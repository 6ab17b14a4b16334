"""CPU path of the 2:4 GEMM: C++ kernels for every x86-64 ISA level (``cpu_ext``).

``sparse24_mm_cpu``: x [..., K] (fp32/bf16/fp16), values [N, K/2], meta [N, ceil(K/8)] uint8,
bias [N] or None -> y [..., N] = x @ decompress_24(values, meta).T + bias, fp32 accumulation.

Decode and small batches (M <= ``cpu_ext.DIRECT_MAX_M``): the direct kernel reads only values +
meta (0.5625x the dense fp32/bf16 bytes), in tiles of about 32 KiB that every pass of rows of x
re-reads from cache, and never builds the dense weight: it gathers x instead. The values of a
group sit at columns 4*group + slot of x, so a permute with indices from the meta nibbles
(computed once per step and reused for every row of x) fetches the matching x entries and one FMA
multiplies them by the values: AVX-512 (vpermt2ps: 16 values per permute), AVX2 (2 x vpermps +
blend: 8 values), or scalar (two products per group). AVX-512 + BF16 (bf16 only): x stays bf16, a
word permute (vpermt2w) places the x pair of each of 16 groups in its 32-bit lane and one vdpbf16ps
multiplies and adds both values of all 16 groups: 32 values per permute and instruction.

Prefill (larger M): the blas path decompresses tiles of weight rows (about 512 KiB) into a
per-thread buffer and runs ATen's GEMM on each, tiles spread over threads, so a dense copy of the
whole weight is never held.

ISA: ``isa=`` (explicit), else ``use_cpu_isa`` / ``SPARSEKIT_CPU_ISA``, else the best the CPU runs
(``cpu_ext.resolve_isa``). Where the extension cannot build, a chunked decompress + F.linear in
plain torch takes over (logged once); ``SPARSEKIT_CPU_EXT=0`` forces that fallback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_ext
from ._backend import CpuIsa
from .cpu_ext import CPP_SOURCES, build_error, choose_path, extension, isa_level, resolve_isa

ROW_BLOCK = 256  # rows per decompressed block in the plain-torch fallback: 256 x 4096 fp32 = 4 MiB
CPP_SOURCE = CPP_SOURCES[1]  # the 2:4 kernels' file (cpu_common.cpp and bitmap_cpu.cpp sit beside it)


# ----------------------------------------------------------------------------- plain-torch fallback
def decompress_24_torch(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """values [N, K/2], meta [N, ceil(K/8)] -> dense [N, K]: select per slot, no scatter."""
    rows, half = values.shape
    groups = half // 2
    nib = torch.stack((meta & 15, meta >> 4), dim=-1).reshape(rows, -1)[:, :groups]
    i0, i1 = (nib & 3).unsqueeze(-1), (nib >> 2).unsqueeze(-1)
    slot = torch.arange(4, dtype=torch.uint8, device=values.device)
    v = values.reshape(rows, groups, 2)
    zero = values.new_zeros(())
    dense = torch.where(i0 == slot, v[..., :1], torch.where(i1 == slot, v[..., 1:], zero))
    return dense.reshape(rows, 2 * half)


def decompress_rows(
    values: torch.Tensor,
    meta: torch.Tensor,
    n0: int,
    n1: int,
    out: torch.Tensor | None = None,
    isa: CpuIsa | str | None = None,
) -> torch.Tensor:
    """Dense rows [n0, n1) of the weight [N, K], written into ``out`` [n1 - n0, K] (contiguous) when given."""
    ext = extension()
    values, meta = values.contiguous(), meta.contiguous()
    k = 2 * values.shape[1]
    if out is None:
        out = values.new_empty(n1 - n0, k)
    if ext is not None:
        ext.decompress24_rows(values, meta, n0, out, isa_level(resolve_isa(isa)))
    else:
        out.copy_(decompress_24_torch(values[n0:n1], meta[n0:n1]))
    return out


def _blocked_mm(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None):
    """Plain-torch fallback: y [M, N] via ROW_BLOCK rows of the weight at a time, decompressed, F.linear."""
    m, k = x2.shape
    n = values.shape[0]
    y = x2.new_empty(m, n)
    for n0 in range(0, n, ROW_BLOCK):
        n1 = min(n0 + ROW_BLOCK, n)
        w = decompress_24_torch(values[n0:n1], meta[n0:n1])
        y[:, n0:n1] = F.linear(x2, w, None if bias is None else bias[n0:n1])
    return y


def sparse24_mm_cpu(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    isa: CpuIsa | str | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """CPU 2:4 GEMM (inputs already checked by ``sparse24_mm``); never holds the dense weight.

    ``isa``: None follows ``use_cpu_isa`` / SPARSEKIT_CPU_ISA; ``path``: 'auto' (by M, see
    ``cpu_ext.DIRECT_MAX_M``), 'direct' or 'blas'.
    """
    n = values.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    values, meta = values.contiguous(), meta.contiguous()
    ext = extension()
    if ext is None:
        return _blocked_mm(x2, values, meta, bias).reshape(*x.shape[:-1], n)
    chosen = resolve_isa(isa)
    route = choose_path("2:4", chosen, x.dtype, x2.shape[0], path)
    b = bias.contiguous() if bias is not None else None
    y = ext.mm24(x2.contiguous(), values, meta, b, isa_level(chosen), route, cpu_ext.BLAS_TILE_BYTES)
    return y.reshape(*x.shape[:-1], n)


def bind_sparse24_cpu(
    values: torch.Tensor, meta: torch.Tensor, isa: CpuIsa | str | None = None
) -> Callable[..., torch.Tensor]:
    """``fn(x, bias) -> y``: the CPU 2:4 GEMM of one stored weight with every check done now.

    What a model's decode loop calls hundreds of times per token: the format, contiguity and ISA
    are checked once here (``sparse24_mm`` re-checks them on every call, then dispatches a custom
    op); the returned call only reshapes x, picks the path by M and enters the C++ kernel. x must be
    [..., K] of the values' dtype on the CPU (``SparseLinear`` checks width, dtype and device before
    taking this path).
    """
    if values.device.type != "cpu" or not values.is_contiguous() or not meta.is_contiguous():
        raise ValueError("bind_sparse24_cpu needs contiguous CPU values and meta")
    n, k = values.shape[0], 2 * values.shape[1]
    ext = extension()
    if ext is None:
        return lambda x, bias: _blocked_mm(x.reshape(-1, k), values, meta, bias).reshape(*x.shape[:-1], n)
    level, most, tile = cpu_ext.route_args("2:4", values.dtype, k, isa=isa)

    def mm(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x [..., K] as it comes: the C++ entry flattens it and gives y its leading dims
        return ext.mm24(x, values, meta, bias, level, int(x.numel() > most), tile)

    return mm


def has_fast_path() -> bool:
    """True when the extension built and this CPU runs one of its vector paths (AVX2 or AVX-512)."""
    return extension() is not None and cpu_ext.supported_isa() is not CpuIsa.SCALAR


__all__ = [
    "CPP_SOURCE",
    "bind_sparse24_cpu",
    "build_error",
    "decompress_24_torch",
    "decompress_rows",
    "extension",
    "has_fast_path",
    "sparse24_mm_cpu",
]
