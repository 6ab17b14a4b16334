"""What the inference GEMMs (sparse24_mm, masked_mm, bitmap_mm) share: autotune configs, the
grouped tile order and the bias/store epilogue (``@triton.jit`` helpers), and the fp32 reference.

The key is ``(M_BUCKET, N, K)``: the wrapper passes ``M_BUCKET = m_bucket(M)`` so decode sizes
(M <= 64) and prefill sizes tune separately and a new M inside a bucket reuses the choice.
One list serves A100 and H100: ``prune`` drops configs whose pipelined tiles do not fit the
device's shared memory (A100 164 KiB, H100 228 KiB per block), so the deep H100-only configs
vanish on A100.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

DECODE_MAX_M = 64  # at or below this M the weight stream dominates: small BLOCK_M, wide BLOCK_K

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_DECODE = [
    (16, 32, 128, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 64, 256, 4, 3),
    (16, 128, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (64, 64, 128, 4, 3),
]
_PREFILL = [
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 4),  # 192 KiB of stages at fp16: fits H100 only
]


def m_bucket(m: int) -> int:
    """Autotune bucket of M: powers of two up to 64 for decode, then 128/256/512/1024+."""
    return min(max(16, triton.next_power_of_2(m)), 1024)


def gemm_configs(block_k: int | None = None) -> list[triton.Config]:
    """Decode and prefill configs; ``block_k`` pins BLOCK_K for kernels whose format fixes it."""
    seen, out = set(), []
    for decode, table in ((True, _DECODE), (False, _PREFILL)):
        for bm, bn, bk, warps, stages in table:
            bk = block_k or bk
            if (bm, bn, bk, warps, stages) in seen:
                continue
            seen.add((bm, bn, bk, warps, stages))
            cfg = triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages
            )
            cfg.decode = decode  # read by prune(): which M bucket the config is for
            out.append(cfg)
    return out


@functools.lru_cache(maxsize=8)
def _smem_limit(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 163 * 1024  # A100's opt-in limit: the conservative choice for AOT and the interpreter
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 163 * 1024)


def prune(configs, named_args, **kwargs):
    """Keep configs for this M bucket that fit shared memory (early_config_prune hook)."""
    bucket = named_args["M_BUCKET"]
    elem = named_args["x_ptr"].element_size()
    limit = _smem_limit(named_args["x_ptr"].device.index or 0)
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if getattr(c, "decode", bm <= DECODE_MAX_M) != (bucket <= DECODE_MAX_M):
            continue
        if bm > max(16, bucket):  # tl.dot needs BLOCK_M >= 16; larger tiles would only pad M
            continue
        if c.num_stages * (bm + bn) * bk * elem > limit:
            continue
        kept.append(c)
    return kept or configs[:1]


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [M, K] without copying when the leading dims flatten."""
    return x.reshape(-1, x.shape[-1])


@triton.jit
def compute_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n) in grouped order: GROUP_M row tiles share each weight tile
    while it is in L2 (the swizzle of Triton's matmul tutorial)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def store_tile(acc, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """y[rm, rn] = acc (+ bias[rn]), cast to y's dtype; rows >= M and columns >= N masked."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear_ref(x: torch.Tensor, dense_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The references' one body: x [..., K] @ W [N, K].T + bias in fp32, cast back to x's dtype."""
    y = x.float() @ dense_weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
