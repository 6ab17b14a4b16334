"""GEMM through a bit mask, with autograd: fine-tune a pruned model while keeping its mask.

x [..., K] (fp16/bf16/fp32), weight [N, K] (same dtype), mask_bits [N, ceil(K/8)] uint8
(``pack_mask`` layout, True = keep), bias [N] or None -> y [..., N] = x @ (W * M).T + bias.

The kernel applies the mask to each weight tile in registers (W * M is never written to memory)
and skips K tiles whose mask is all zero (no x / weight loads, no MMA). Backward:
dX = dY @ (W * M) (same kernel, weight read transposed), dW = (dY.T @ X) * M, so pruned
weights get zero gradient and stay pruned under any optimizer without weight decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import Backend, check_dtype, check_same_device, launch, use_triton
from ._gemm_common import as_2d, compute_pid, gemm_configs, linear_ref, m_bucket, prune, store_tile
from .aot import AotCase, gemm_signature
from .dtypes import FLOAT_DTYPES
from .mask_bits import unpack_bits
from .sparse24 import dot_precision


@triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "TRANS_W"],
    prune_configs_by={"early_config_prune": prune},
)
@triton.jit
def _masked_mm_kernel(
    x_ptr,
    w_ptr,
    mask_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wr,
    stride_wc,
    stride_mr,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    TRANS_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    # y[M, N] = x[M, K] @ B[K, N] with B = (W * Mask).T (forward, W [N, K]) or W * Mask
    # (TRANS_W, backward dX, W [K, N]); mask bits are packed along W's columns either way.
    pid_m, pid_n = compute_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    shifts = tl.arange(0, 8)
    m_ok = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if TRANS_W:  # W [K, N]: tile [BLOCK_K, BLOCK_N], bytes along N (BLOCK_N % 8 == 0)
            rb = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
            ok = (kk[:, None] < K) & (rb[None, :] < (N + 7) // 8)
            byte = tl.load(mask_ptr + kk[:, None] * stride_mr + rb[None, :], mask=ok, other=0).to(tl.int32)
            bits = tl.reshape((byte[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_K, BLOCK_N))
        else:  # W [N, K]: tile [BLOCK_N, BLOCK_K], bytes along K (BLOCK_K % 8 == 0)
            rb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            ok = (rn[:, None] < N) & (rb[None, :] < (K + 7) // 8)
            byte = tl.load(mask_ptr + rn[:, None] * stride_mr + rb[None, :], mask=ok, other=0).to(tl.int32)
            bits = tl.reshape((byte[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_N, BLOCK_K))
        if tl.max(tl.max(bits, axis=1), axis=0) != 0:  # an all-pruned tile costs only its mask bytes
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok & (kk[None, :] < K)
            )
            if TRANS_W:
                w_ok = (kk[:, None] < K) & (rn[None, :] < N)
                w = tl.load(w_ptr + kk[:, None] * stride_wr + rn[None, :] * stride_wc, mask=w_ok, other=0.0)
                w = tl.where(bits != 0, w, tl.zeros_like(w))
            else:
                w_ok = (rn[:, None] < N) & (kk[None, :] < K)
                w = tl.load(w_ptr + rn[:, None] * stride_wr + kk[None, :] * stride_wc, mask=w_ok, other=0.0)
                w = tl.trans(tl.where(bits != 0, w, tl.zeros_like(w)))
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    store_tile(acc, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


def _check(x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("weight", weight, FLOAT_DTYPES)
    check_dtype("mask_bits", mask_bits, (torch.uint8,))
    check_same_device(x=x, weight=weight, mask_bits=mask_bits, bias=bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., K] with K = weight.shape[1] = {k}, got shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}; cast one")
    if tuple(mask_bits.shape) != (n, (k + 7) // 8):
        raise ValueError(
            f"mask_bits must be [N, ceil(K/8)] = ({n}, {(k + 7) // 8}) for weight {tuple(weight.shape)}, "
            f"got {tuple(mask_bits.shape)}; build it with pack_mask(mask)"
        )
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [N] = [{n}] of {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def _launch(x2, weight, mask_bits, bias, n_out, trans_w, interpret_config=None):
    m, k = x2.shape
    y = torch.empty((m, n_out), dtype=x2.dtype, device=x2.device)
    weight, mask_bits = weight.contiguous(), mask_bits.contiguous()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)
    cfg = interpret_config or {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}
    launch(
        _masked_mm_kernel,
        grid,
        cfg,
        x2,
        weight,
        mask_bits,
        bias if bias is not None else y,  # placeholder pointer, never read when HAS_BIAS is False
        y,
        m,
        n_out,
        k,
        m_bucket(m),
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        mask_bits.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        TRANS_W=trans_w,
        DOT_PRECISION=dot_precision(x2.dtype),
    )
    return y


def _masked_weight(weight: torch.Tensor, mask_bits: torch.Tensor) -> torch.Tensor:
    return weight * unpack_bits(mask_bits, weight.shape[1])


@torch.library.custom_op("sparsekit::masked_mm", mutates_args=())
def _masked_mm_op(
    x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor, bias: torch.Tensor | None, triton: bool
) -> torch.Tensor:
    if triton:
        y = _launch(as_2d(x), weight, mask_bits, bias, weight.shape[0], trans_w=False)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, _masked_weight(weight, mask_bits), bias)


@_masked_mm_op.register_fake
def _(x, weight, mask_bits, bias, triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("sparsekit::masked_mm_grad_input", mutates_args=())
def _masked_mm_grad_input_op(
    grad_y: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor, triton: bool
) -> torch.Tensor:
    """grad_y [..., N] -> grad_x [..., K] = grad_y @ (W * M)."""
    if triton:
        gx = _launch(as_2d(grad_y), weight, mask_bits, None, weight.shape[1], trans_w=True)
        return gx.reshape(*grad_y.shape[:-1], weight.shape[1])
    return grad_y @ _masked_weight(weight, mask_bits)


@_masked_mm_grad_input_op.register_fake
def _(grad_y, weight, mask_bits, triton):
    return grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, mask_bits, bias, triton = inputs
    ctx.save_for_backward(x, weight, mask_bits)
    ctx.has_bias = bias is not None
    ctx.triton = triton


def _backward(ctx, grad_y):
    x, weight, mask_bits = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.sparsekit.masked_mm_grad_input(grad_y, weight, mask_bits, ctx.triton)
    if ctx.needs_input_grad[1]:
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_w = (g2.T @ x.reshape(-1, x.shape[-1])) * unpack_bits(mask_bits, weight.shape[1])
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, grad_w, None, grad_b, None


torch.library.register_autograd("sparsekit::masked_mm", _backward, setup_context=_setup_context)


def masked_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_bits: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (weight [N, K] * unpack_mask(mask_bits)).T + bias.

    Differentiable in x, weight and bias; the weight gradient is masked (pruned entries get 0).
    ``backend``: None follows ``use_backend`` / the default (see ``sparsekit.kernels.Backend``).
    """
    _check(x, weight, mask_bits, bias)
    triton = use_triton(x, weight, mask_bits, backend=backend)
    return torch.ops.sparsekit.masked_mm(x, weight, mask_bits, bias, triton)


def masked_mm_ref(
    x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Eager reference: materialize W * M, fp32 matmul, cast back."""
    _check(x, weight, mask_bits, bias)
    return linear_ref(x, _masked_weight(weight, mask_bits), bias)


_SIG_ARGS = (
    ["x_ptr", "w_ptr", "mask_ptr", "bias_ptr", "y_ptr"],
    ["M", "N", "K", "M_BUCKET", "stride_xm", "stride_wr", "stride_mr", "stride_ym"],
)
# forward decode/prefill, bf16 prefill, and the backward dX variant (weight read transposed)
AOT_CASES = [
    AotCase.gemm(
        f"masked_mm-{label}-{dtype}",
        _masked_mm_kernel,
        gemm_signature(*_SIG_ARGS, dtype, pointer_types={"mask_ptr": "*u8"}),
        blocks,
        warps,
        stages,
        stride_xk=1,
        stride_wc=1,
        HAS_BIAS=not trans,
        TRANS_W=trans,
        DOT_PRECISION="tf32",
    )
    for label, dtype, trans, blocks, warps, stages in (
        ("decode", "fp16", False, (16, 64, 128), 4, 4),
        ("prefill", "fp16", False, (128, 128, 64), 8, 3),
        ("prefill", "bf16", False, (128, 128, 64), 8, 3),
        ("grad_input", "bf16", True, (128, 128, 64), 8, 3),
    )
]
