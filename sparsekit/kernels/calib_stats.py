"""Calibration statistics accumulated from layer inputs, always in fp32.

x [T, K] (any float dtype) -> sum of squares per channel [K] (Wanda) and X^T X [K, K]
(SparseGPT's Hessian before its 2/n scale). CUDA: Triton kernels that read x once in its own
dtype and accumulate in fp32 (no fp32 copy of x); CPU: torch on an fp32 copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import check_dtype, check_same_device, interpreting, use_triton
from .aot import AotCase, gemm_signature
from .dtypes import FLOAT_DTYPES


@triton.jit
def _sq_sum_kernel(x_ptr, out_ptr, T, K, stride_xt, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[K] fp32 += sum_t x[t, :]^2; one program per BLOCK_K channels, looping over tokens
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rt = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + rt
        ok = (tt[:, None] < T) & (rk[None, :] < K)
        x = tl.load(x_ptr + tt[:, None] * stride_xt + rk[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=0)
    prev = tl.load(out_ptr + rk, mask=rk < K, other=0.0)
    tl.store(out_ptr + rk, prev + acc, mask=rk < K)


@triton.jit
def _gram_kernel(
    x_ptr,
    out_ptr,
    T,
    K,
    stride_xt,
    stride_om,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[K, K] fp32 += x[T, K]^T @ x[T, K]: tile (m, n) of the output, reduction over tokens
    # (BLOCK_K is the token tile: the GEMM's reduction dim). Both triangles are computed, as
    # torch's addmm does; an fp32 tile keeps the products and the sum in fp32 for 16-bit x.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_K):
        tt = t0 + rt
        a = tl.load(x_ptr + tt[:, None] * stride_xt + rm[None, :], mask=(tt[:, None] < T) & (rm[None, :] < K))
        b = tl.load(x_ptr + tt[:, None] * stride_xt + rn[None, :], mask=(tt[:, None] < T) & (rn[None, :] < K))
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    ok = (rm[:, None] < K) & (rn[None, :] < K)
    ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + acc, mask=ok)


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _check(x: torch.Tensor, out: torch.Tensor, shape: tuple[int, ...]) -> None:
    check_dtype("x", x, FLOAT_DTYPES)
    check_same_device(x=x, out=out)
    if out.dtype != torch.float32 or tuple(out.shape) != shape:
        raise ValueError(f"out must be an fp32 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous; allocate it with torch.zeros")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 statistics stay exact fp32 (tf32 would cost ~3 digits of the Hessian)
    return "ieee" if dtype == torch.float32 else "tf32"


# fixed launch configs (no autotune: both kernels are bandwidth- or MMA-bound at any K of an LLM)
_SQ_SUM_CFG = {"BLOCK_T": 64, "BLOCK_K": 256, "num_warps": 4}
_GRAM_CFG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
# the interpreter runs every program in Python: small tiles keep the tests fast
_SQ_SUM_INTERP = {"BLOCK_T": 16, "BLOCK_K": 32}
_GRAM_INTERP = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}


def _run(kernel, grid, cfg: dict, *args, **kwargs) -> None:
    kernel[grid(cfg)](*args, **kwargs, **cfg)


def accumulate_sq_sum(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [K] fp32 += sum over tokens of x**2; x [..., K] fp16/bf16/fp32 (accumulated in fp32)."""
    _check(x, out, (x.shape[-1],))
    tokens = _as_tokens(x)
    if use_triton(tokens, out):
        tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
        t, k = tokens.shape
        cfg = _SQ_SUM_INTERP if interpreting() else _SQ_SUM_CFG
        grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]),)
        _run(_sq_sum_kernel, grid, cfg, tokens, out, t, k, tokens.stride(0))
        return out
    out.add_(tokens.float().square().sum(dim=0))
    return out


def accumulate_gram(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [K, K] fp32 += x^T x; x [..., K] fp16/bf16/fp32 (products and sums in fp32)."""
    k = x.shape[-1]
    _check(x, out, (k, k))
    tokens = _as_tokens(x)
    if use_triton(tokens, out):
        tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
        cfg = _GRAM_INTERP if interpreting() else _GRAM_CFG
        grid = lambda meta: (triton.cdiv(k, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]))
        _run(
            _gram_kernel,
            grid,
            cfg,
            tokens,
            out,
            tokens.shape[0],
            k,
            tokens.stride(0),
            out.stride(0),
            DOT_PRECISION=_dot_precision(tokens.dtype),
        )
        return out
    _symmetric_gram_(tokens.float(), out)
    return out


GRAM_TILES = 4  # CPU: column tiles of the symmetric Gram; 4 tiles compute 10 of 16 blocks


def _symmetric_gram_(x: torch.Tensor, out: torch.Tensor) -> None:
    """out += x^T x computing only the block upper triangle (GEMMs on strided views of x [T, K])
    and adding its mirror image below the diagonal: 0.625x the flops of the full product at 4
    tiles. ``out`` need not be symmetric: both triangles are accumulated, never overwritten.
    Small K: one GEMM."""
    k = x.shape[1]
    if k < 512:
        out.addmm_(x.T, x)
        return
    bounds = [k * i // GRAM_TILES for i in range(GRAM_TILES + 1)]
    for i0, i1 in zip(bounds[:-1], bounds[1:], strict=True):
        strip = x[:, i0:i1].T @ x[:, i0:]  # [i1 - i0, K - i0]: the diagonal block and right of it
        out[i0:i1, i0:] += strip
        out[i1:, i0:i1] += strip[:, i1 - i0 :].T


AOT_CASES = [
    AotCase.gemm(
        f"calib_gram-{dtype}",
        _gram_kernel,
        gemm_signature(
            ["x_ptr", "out_ptr"],
            ["T", "K", "stride_xt", "stride_om"],
            dtype,
            pointer_types={"out_ptr": "*fp32"},
            unaligned=("T",),
        ),
        (128, 128, 32),
        8,
        3,
        DOT_PRECISION="tf32",
    )
    for dtype in ("fp16", "bf16")
] + [
    AotCase(
        f"calib_sq_sum-{dtype}",
        _sq_sum_kernel,
        {"x_ptr": f"*{dtype}", "out_ptr": "*fp32", "T": "i32", "K": "i32", "stride_xt": "i32"},
        {"BLOCK_T": 64, "BLOCK_K": 256},
        is_gemm=False,
        num_warps=4,
        num_stages=1,
        aligned=("x_ptr", "out_ptr", "K", "stride_xt"),
    )
    for dtype in ("fp16", "bf16")
]
