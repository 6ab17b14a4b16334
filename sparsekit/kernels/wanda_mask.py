"""Wanda mask: keep the largest |W| * ||X||_2 per output row (or top n of every m columns).

weight [N, K] (fp32/fp16/bf16), act_norm [K] fp32 (l2 norm of each input channel over the
calibration tokens) -> mask_bits [N, ceil(K/8)] uint8 (unpack with ``unpack_mask``).
Ties break toward the lower column index, so the mask is deterministic and every backend
must equal ``wanda_mask_ref`` bit for bit.

The Triton kernel never materializes the score matrix: each program owns BLOCK_R rows and
recomputes score = |w| * act_norm (fp32, one rounding, as torch) chunk by chunk. Unstructured:
non-negative fp32 scores order like their int32 bit patterns, so a 31-step bisection on the
bit pattern with per-row counts finds the keep-th largest score T exactly; entries > T are kept,
and entries == T are kept in column order while room is left (a running prefix count).
N:M: each entry's rank inside its group is counted against the group's m scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import check_dtype, check_same_device, launch, use_triton
from .aot import AotCase
from .dtypes import FLOAT_DTYPES
from .mask_bits import pack_mask
from .topk_select import keep_count, nm_keep_mask, topk_keep_mask

INF_BITS = tl.constexpr(0x7F800000)  # +inf as int32: every finite non-negative score's bits are below it
BISECT_STEPS = tl.constexpr(31)  # the bit patterns of non-negative floats span [0, 2^31): 31 halvings


def _configs():
    return [
        triton.Config({"BLOCK_R": r, "BLOCK_K": k}, num_warps=w)
        for r, k, w in ((1, 1024, 4), (2, 512, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4))
    ]


@triton.jit
def _scores(w_ptr, norm_ptr, rows, cols, stride_wn, N, K):
    ok = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    norm = tl.load(norm_ptr + cols, mask=cols < K, other=0.0)
    s = tl.abs(w) * norm[None, :] + 0.0  # + 0.0 turns -0.0 into +0.0 so bit order == float order
    return s, ok


@triton.jit
def _store_bits(out_ptr, keep, rows, k0, stride_on, N, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # LSB-first bytes: byte b of a row holds columns 8b..8b+7; BLOCK_K % 8 == 0 so tiles own whole bytes
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_R, BLOCK_K // 8, 8))
    shifts = tl.arange(0, 8)
    byte = tl.sum(bits << shifts[None, None, :], axis=2)
    rb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    ok = (rows[:, None] < N) & (rb[None, :] < (K + 7) // 8)
    tl.store(out_ptr + rows[:, None] * stride_on + rb[None, :], byte.to(tl.uint8), mask=ok)


@triton.autotune(configs=_configs(), key=["N", "K", "NM_M"])
@triton.jit
def _wanda_mask_kernel(
    w_ptr,
    norm_ptr,
    out_ptr,
    N,
    K,
    keep,
    stride_wn,
    stride_on,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # weight [N, K], norm [K] fp32 -> out [N, ceil(K/8)] uint8; NM_M == 0: top ``keep`` per row,
    # else top NM_N of every NM_M columns (BLOCK_K % NM_M == 0: no group straddles two tiles)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    if NM_M == 0:
        lo = tl.zeros((BLOCK_R,), dtype=tl.int32)  # count(bits >= lo) >= keep holds throughout
        hi = tl.full((BLOCK_R,), INF_BITS, dtype=tl.int32)
        for _ in range(BISECT_STEPS):
            mid = lo + (hi - lo + 1) // 2
            count = tl.zeros((BLOCK_R,), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                s, ok = _scores(w_ptr, norm_ptr, rows, k0 + rk, stride_wn, N, K)
                hit = (s.to(tl.int32, bitcast=True) >= mid[:, None]) & ok
                count += tl.sum(hit.to(tl.int32), axis=1)
            enough = count >= keep
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        # lo = bits of the keep-th largest score; room = how many of the ties at lo fit
        above = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            s, ok = _scores(w_ptr, norm_ptr, rows, k0 + rk, stride_wn, N, K)
            above += tl.sum(((s.to(tl.int32, bitcast=True) > lo[:, None]) & ok).to(tl.int32), axis=1)
        room = keep - above
        seen = tl.zeros((BLOCK_R,), dtype=tl.int32)  # ties met in earlier tiles (lower columns)
        for k0 in range(0, K, BLOCK_K):
            s, ok = _scores(w_ptr, norm_ptr, rows, k0 + rk, stride_wn, N, K)
            bits = s.to(tl.int32, bitcast=True)
            tie = ((bits == lo[:, None]) & ok).to(tl.int32)
            rank = seen[:, None] + tl.cumsum(tie, axis=1)  # 1-based order among the ties
            keep_tile = ((bits > lo[:, None]) | ((tie != 0) & (rank <= room[:, None]))) & ok
            seen += tl.sum(tie, axis=1)
            _store_bits(out_ptr, keep_tile, rows, k0, stride_on, N, K, BLOCK_R, BLOCK_K)
    else:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + rk
            s, ok = _scores(w_ptr, norm_ptr, rows, cols, stride_wn, N, K)
            pos = cols % NM_M
            beaten = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
            for j in tl.static_range(NM_M):  # rank = group members that beat this one
                other, _ = _scores(w_ptr, norm_ptr, rows, cols - pos + j, stride_wn, N, K)
                beats = (other > s) | ((other == s) & (j < pos[None, :]))
                beaten += beats.to(tl.int32)
            _store_bits(out_ptr, (beaten < NM_N) & ok, rows, k0, stride_on, N, K, BLOCK_R, BLOCK_K)


def _check_pattern(cols: int, sparsity: float | None, n: int | None, m: int | None) -> None:
    if (sparsity is None) == (n is None or m is None):
        raise ValueError("give either sparsity=<float in [0, 1)> or n=<keep>, m=<group>, not both")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if n is not None and m is not None:
        if not 0 < n <= m:
            raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
        if cols % m:
            raise ValueError(f"{n}:{m} sparsity needs in_features % {m} == 0, got {cols}")


def _check_inputs(weight: torch.Tensor, act_norm: torch.Tensor, values: bool = True) -> None:
    check_dtype("weight", weight, FLOAT_DTYPES)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    if act_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"act_norm must be [in_features] = [{weight.shape[1]}], got shape {tuple(act_norm.shape)}"
        )
    check_same_device(weight=weight, act_norm=act_norm)
    if values:  # data-dependent: skipped while tracing, checked again inside the custom op
        _check_values(act_norm)


def _check_values(act_norm: torch.Tensor) -> None:
    if not torch.isfinite(act_norm).all():
        raise ValueError("act_norm has NaN/inf: the calibration activations overflowed; check the inputs")


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """|W| * act_norm broadcast over rows, in fp32: [N, K]."""
    return weight.float().abs() * act_norm.float().unsqueeze(0)


def wanda_mask_ref(
    weight: torch.Tensor,
    act_norm: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> torch.Tensor:
    """Plain reference: full sort of each row's scores -> bool mask [N, K] (True = keep)."""
    _check_inputs(weight, act_norm)
    _check_pattern(weight.shape[1], sparsity, n, m)
    scores = wanda_scores(weight, act_norm)
    rows, cols = scores.shape
    if sparsity is not None:
        group, keep = cols, keep_count(cols, sparsity)
    else:
        group, keep = m, n
    grouped = scores.reshape(rows, cols // group, group)
    order = grouped.sort(dim=-1, descending=True, stable=True).indices[..., :keep]
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(rows, cols)


def wanda_mask_torch(
    weight: torch.Tensor,
    act_norm: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> torch.Tensor:
    """Fast torch path (kthvalue threshold + tie fix-up, no sort) -> bool mask [N, K]."""
    _check_inputs(weight, act_norm)
    _check_pattern(weight.shape[1], sparsity, n, m)
    scores = wanda_scores(weight, act_norm)
    if sparsity is not None:
        return topk_keep_mask(scores, keep_count(scores.shape[1], sparsity))
    return nm_keep_mask(scores, n, m)


def _wanda_mask_triton(
    weight: torch.Tensor,
    act_norm: torch.Tensor,
    sparsity: float | None,
    n: int | None,
    m: int | None,
    interpret_config: dict | None = None,
) -> torch.Tensor:
    rows, cols = weight.shape
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    norm = act_norm.float().contiguous()
    out = torch.empty((rows, (cols + 7) // 8), dtype=torch.uint8, device=weight.device)
    keep = keep_count(cols, sparsity) if sparsity is not None else 0
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)
    launch(
        _wanda_mask_kernel,
        grid,
        interpret_config or {"BLOCK_R": 2, "BLOCK_K": 64},
        weight,
        norm,
        out,
        rows,
        cols,
        keep,
        weight.stride(0),
        out.stride(0),
        NM_N=n or 0,
        NM_M=m or 0,
    )
    return out


@torch.library.custom_op("sparsekit::wanda_mask", mutates_args=())
def _wanda_mask_op(
    weight: torch.Tensor, act_norm: torch.Tensor, sparsity: float | None, n: int | None, m: int | None
) -> torch.Tensor:
    _check_values(act_norm)
    if use_triton(weight, act_norm):
        return _wanda_mask_triton(weight, act_norm, sparsity, n, m)
    return pack_mask(wanda_mask_torch(weight, act_norm, sparsity, n, m))


@_wanda_mask_op.register_fake
def _(weight, act_norm, sparsity, n, m):
    return weight.new_empty((weight.shape[0], (weight.shape[1] + 7) // 8), dtype=torch.uint8)


def wanda_mask(
    weight: torch.Tensor,
    act_norm: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> torch.Tensor:
    """Wanda mask, packed: weight [N, K] fp16/bf16/fp32, act_norm [K] -> mask_bits [N, ceil(K/8)] uint8.

    Keeps per output row the K - floor(K * sparsity) largest |W| * act_norm, or the top n of every
    m consecutive columns; True = keep, ties -> the lower column index (equals ``wanda_mask_ref``).
    CUDA: one Triton kernel (no score matrix); CPU: ``wanda_mask_torch``. A custom op, so
    ``torch.compile(fullgraph=True)`` traces through it.
    """
    _check_inputs(weight, act_norm, values=False)
    _check_pattern(weight.shape[1], sparsity, n, m)
    if m is not None and m > 64:
        raise ValueError(f"N:M needs M <= 64 (each entry is ranked against its group), got M={m}")
    return _wanda_mask_op(weight, act_norm, sparsity, n, m)


# unstructured (bisection) and N:M 2:4 at a LLaMA-7B shape's config, fp16 and bf16 weights
AOT_CASES = [
    AotCase(
        f"wanda_mask-{label}-{dtype}",
        _wanda_mask_kernel,
        {
            "w_ptr": f"*{dtype}",
            "norm_ptr": "*fp32",
            "out_ptr": "*u8",
            "N": "i32",
            "K": "i32",
            "keep": "i32",
            "stride_wn": "i32",
            "stride_on": "i32",
        },
        {"NM_N": nm_n, "NM_M": nm_m, "BLOCK_R": block_r, "BLOCK_K": block_k},
        is_gemm=False,
        num_warps=warps,
        num_stages=1,
        aligned=("w_ptr", "norm_ptr", "out_ptr", "K", "stride_wn", "stride_on"),
    )
    for label, dtype, nm_n, nm_m, block_r, block_k, warps in (
        ("unstructured", "fp16", 0, 0, 4, 512, 4),
        ("unstructured", "bf16", 0, 0, 4, 512, 4),
        ("2of4", "bf16", 2, 4, 4, 512, 4),
        ("4of8", "fp16", 4, 8, 4, 512, 4),
    )
]
