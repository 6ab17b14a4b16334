"""CPU path of the 2:4 GEMM: a C++ kernel that expands compressed groups in registers.

``sparse24_mm_cpu``: x [..., K] (fp32/bf16/fp16), values [N, K/2], meta [N, ceil(K/8)] uint8,
bias [N] or None -> y [..., N] = x @ decompress_24(values, meta).T + bias, fp32 accumulation.

Decode (M <= ``DIRECT_MAX_M``): one pass over values + meta (0.5625x the dense fp32/bf16 bytes),
in tiles of about 32 KiB that every 8 rows of x re-read from cache.
With AVX-512 each 64-column step loads 8 meta bytes and 32 values and never builds the dense
weight: it gathers x instead. The 16 values of 8 groups sit at columns 4*group + slot inside 32
columns of x, so one two-source permute (vpermt2ps, indices from the meta word: computed once
per step and reused for every row of x) fetches the matching x entries and one FMA multiplies
them by the values: 2 permutes + 2 FMAs per 64 columns and row. Without AVX-512 the same loop
runs scalar (correct, not fast).

Prefill (larger M): decompress ``ROW_BLOCK`` rows at a time into a reused buffer and run the BLAS
GEMM on it, so a dense copy of the whole weight is never held either.

The extension builds once per machine with the system C++ compiler (the same one
torch.compile's CPU backend needs) and is cached by torch under ~/.cache/torch_extensions;
``-march=native`` is keyed into its name. Where it cannot build, a chunked decompress + F.linear
in plain torch takes over (logged once). ``SPARSEKIT_CPU_EXT=0`` forces that fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# largest M for the direct kernel; above it, blocked decompress + BLAS GEMM. Measured on the
# Xeon-512 VM of docs/results.md with weight tiles re-read from cache for every 8 rows of x: the
# direct kernel beats dense fp32 through M = 16 and loses from M = 32; in bf16 oneDNN's GEMM
# wins from M = 8 on large shapes, but the direct kernel still beats the blocked path at M = 16
# (bench/bench_cpu_decode_24.py).
DIRECT_MAX_M = {torch.float32: 16, torch.bfloat16: 16, torch.float16: 16}
ROW_BLOCK = 256  # rows per decompressed block in the GEMM path: 256 x 4096 fp32 = 4 MiB

CPP_SOURCE = Path(__file__).with_name("csrc") / "sparse24_cpu.cpp"  # shipped as package data


def _cpu_key() -> str:
    """Hash of the CPU flags, the source and torch, so a cache built with -march=native is never
    reused on another CPU or after the source changes."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    source = CPP_SOURCE.read_bytes()
    return hashlib.sha1(flags.encode() + source + torch.__version__.encode()).hexdigest()[:10]


class _ExtensionLoader:
    """Builds the C++ extension once per process on first use; remembers why when it cannot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.module = None
        self.error: str | None = None  # why the build failed (None: not tried yet, or built)
        self._tried = False

    def get(self):
        if self._tried:
            return self.module
        if os.environ.get("SPARSEKIT_CPU_EXT", "1") == "0":
            return None
        with self._lock:
            if not self._tried:
                self.module = self._build()
                self._tried = True
        return self.module

    def _build(self):
        try:
            from torch.utils.cpp_extension import load_inline

            return load_inline(
                name=f"sparsekit_sparse24_cpu_{_cpu_key()}",
                cpp_sources=[CPP_SOURCE.read_text()],
                functions=["mm", "decompress_rows", "has_avx512"],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
        except Exception as e:  # no compiler, no ninja, exotic platform: stay correct, lose speed
            self.error = f"{type(e).__name__}: {e}"
            log.warning("sparse24 CPU extension did not build (%s); using chunked torch path", e)
            return None


_LOADER = _ExtensionLoader()


def extension():
    """The compiled extension, building it on first use; None where it cannot build."""
    return _LOADER.get()


def build_error() -> str | None:
    """Why the extension did not build (None when it built, or has not been tried)."""
    return _LOADER.error


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
    values: torch.Tensor, meta: torch.Tensor, n0: int, n1: int, out: torch.Tensor | None = None
):
    """Dense rows [n0, n1) of the weight, written into ``out`` [n1 - n0, K] when given."""
    ext = extension()
    values, meta = values.contiguous(), meta.contiguous()
    k = 2 * values.shape[1]
    if out is None:
        out = values.new_empty(n1 - n0, k)
    if ext is not None:
        ext.decompress_rows(values, meta, n0, out)
    else:
        out.copy_(decompress_24_torch(values[n0:n1], meta[n0:n1]))
    return out


def _blocked_mm(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None):
    """y [M, N] via ROW_BLOCK rows of the weight at a time: decompress into a reused buffer, GEMM."""
    m, k = x2.shape
    n = values.shape[0]
    y = x2.new_empty(m, n)
    buf = values.new_empty(min(ROW_BLOCK, n), k)
    for n0 in range(0, n, ROW_BLOCK):
        n1 = min(n0 + ROW_BLOCK, n)
        w = decompress_rows(values, meta, n0, n1, buf[: n1 - n0])
        y[:, n0:n1] = F.linear(x2, w, None if bias is None else bias[n0:n1])
    return y


def sparse24_mm_cpu(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """CPU 2:4 GEMM (inputs already checked by ``sparse24_mm``); never holds the dense weight."""
    n = values.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    values, meta = values.contiguous(), meta.contiguous()
    ext = extension()
    if ext is not None and x2.shape[0] <= DIRECT_MAX_M[x.dtype]:
        y = ext.mm(x2.contiguous(), values, meta, bias.contiguous() if bias is not None else None)
    else:
        y = _blocked_mm(x2, values, meta, bias)
    return y.reshape(*x.shape[:-1], n)


def bind_sparse24_cpu(values: torch.Tensor, meta: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``fn(x, bias) -> y``: the CPU 2:4 GEMM of one stored weight with every check done now.

    What a model's decode loop calls hundreds of times per token: the format and contiguity are
    checked once here (``sparse24_mm`` re-checks them on every call, then dispatches a custom op);
    the returned call only reshapes x and enters the C++ kernel. x must be [..., K] of the values'
    dtype on the CPU (``SparseLinear`` checks width, dtype and device before taking this path).
    """
    if values.device.type != "cpu" or not values.is_contiguous() or not meta.is_contiguous():
        raise ValueError("bind_sparse24_cpu needs contiguous CPU values and meta")
    n, k = values.shape[0], 2 * values.shape[1]
    ext = extension()
    direct_max = DIRECT_MAX_M[values.dtype]

    def mm(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, k)
        if ext is not None and x2.shape[0] <= direct_max:
            y = ext.mm(x2 if x2.is_contiguous() else x2.contiguous(), values, meta, bias)
        else:
            y = _blocked_mm(x2, values, meta, bias)
        return y.reshape(*x.shape[:-1], n)

    return mm


def has_fast_path() -> bool:
    ext = extension()
    return ext is not None and bool(ext.has_avx512())


__all__ = [
    "bind_sparse24_cpu",
    "sparse24_mm_cpu",
    "decompress_rows",
    "decompress_24_torch",
    "extension",
    "has_fast_path",
]
