"""Causal self-attention on the CPU (the C++ kernels in csrc/attention_cpu.cpp): bf16 on CPUs with
AVX512_BF16, fp32 on CPUs with AVX2 + FMA.

``causal_attention_cpu``: q [B, H, S, D], k and v [B, KV, S, D] (all bf16 or all fp32, H a
multiple of KV, D in 64 / 96 / 128 / 256, unit last stride) -> [B, S, H, D] in their dtype, row i
attending to keys 0..i with ``scale`` (default D ** -0.5). ATen's CPU flash kernel takes a
512-token window as one key block, so under ``is_causal`` it still computes the whole square of
scores; these kernels skip the key blocks right of the diagonal (half the work). bf16 runs both
products on ``vdpbf16ps`` (bf16 products, fp32 sums, fp32 online softmax, probabilities rounded to
bf16 for P V, as ATen's bf16 kernel does); fp32 runs them on AVX2 FMAs, everything in fp32.
``causal_attention_reference`` is the torch reference. Calibration forwards use it through
``sparsekit.hf.attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import CpuIsa
from .cpu_ext import extension, isa_level, resolve_isa

HEAD_DIMS = (64, 96, 128, 256)
# the ISA level each dtype's kernel needs
KERNEL_ISA = {torch.bfloat16: CpuIsa.AVX512_BF16, torch.float32: CpuIsa.AVX2}


def causal_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """q [B, H, S, D], k / v [B, KV, S, D] -> [B, S, H, D] in q's dtype (torch SDPA, keys repeated)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2).contiguous()


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot run these inputs (None: it can). Checks shapes, dtypes, device, strides
    and this CPU (the dtype's ISA level, ``KERNEL_ISA``, as ``SPARSEKIT_CPU_ISA`` allows)."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return "q, k and v must be [B, H, S, D]"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_ISA):
        return f"bf16 or fp32 only, all three alike, got {q.dtype} / {k.dtype} / {v.dtype}"
    if not (q.device.type == k.device.type == v.device.type == "cpu"):
        return "CPU tensors only"
    b, h, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, KV, S, D] for q {tuple(q.shape)}"
    if k.shape[1] == 0 or h % k.shape[1]:
        return f"{h} query heads are not a multiple of {k.shape[1]} key heads"
    if d not in HEAD_DIMS:
        return f"head dim {d} is not one of {HEAD_DIMS}"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "the head dim must be contiguous (unit last stride)"
    if extension() is None:
        return "the C++ extension did not build"
    need = KERNEL_ISA[q.dtype]
    if isa_level(resolve_isa()) < isa_level(need):
        return f"this CPU (or SPARSEKIT_CPU_ISA) runs {resolve_isa().value}, not {need.value} ({q.dtype})"
    return None


@torch.library.custom_op("sparsekit::causal_attention_cpu", mutates_args=())
def _causal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if q.dtype == torch.float32:
        return extension().causal_attention_f32(q, k, v, scale)
    return extension().causal_attention_bf16(q, k, v, scale)


@_causal_attention_op.register_fake
def _(q, k, v, scale):
    b, h, s, d = q.shape
    return q.new_empty((b, s, h, d))


def causal_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """q [B, H, S, D], k / v [B, KV, S, D] bf16 or fp32 -> [B, S, H, D] causal attention in their
    dtype (no grad).
    Raises a ValueError naming the problem where ``unsupported_reason`` gives one (under
    ``torch.compile`` the C++ kernel's own checks raise instead)."""
    reason = None if torch.compiler.is_compiling() else unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"causal_attention_cpu: {reason}; use causal_attention_reference (torch SDPA)")
    return _causal_attention_op(q, k, v, float(q.shape[-1] ** -0.5 if scale is None else scale))


__all__ = [
    "HEAD_DIMS",
    "KERNEL_ISA",
    "causal_attention_cpu",
    "causal_attention_reference",
    "unsupported_reason",
]
