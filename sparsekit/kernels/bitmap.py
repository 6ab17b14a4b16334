"""Bitmap-compressed unstructured sparse weights and the decode GEMM that expands them on chip.

Format (``compress_bitmap``), for weight [N, K] with nnz nonzeros, T = ceil(K / TILE_K) tiles
of TILE_K = 64 columns per row:
  values    [nnz]            weight dtype: the nonzeros in row-major order (``weight[weight != 0]``)
  mask_bits [N, ceil(K/8)]   uint8, ``pack_mask`` layout (LSB first, True = nonzero)
  offsets   [N, T]           int32: index in ``values`` of the first nonzero of tile (n, t),
                             i.e. the number of nonzeros before column 64 * t of row n
A tile's values are ``values[offsets[n, t] : offsets[n, t] + popcount(tile bits)]``, so the
kernel finds them with one offset load per (row, tile) and an exclusive prefix sum (tl.cumsum)
over the tile's bits. Bytes per weight: s = kept fraction, b = dtype bytes:
s * b + 1/8 + 4/64, i.e. 1.19 at 50% kept fp16 (the offsets are 1/16 byte per weight).

``bitmap_mm``: x [..., K], (values, mask_bits, offsets), bias [N] or None -> y [..., N] =
x @ W.T + bias with fp32 accumulation. CPU tensors run the C++ kernels of ``bitmap_cpu`` (no
whole-matrix decompression per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import cpu_ext
from ._backend import Backend, check_dtype, check_same_device, launch, use_triton
from ._cpu_ops import cpu_op_applies
from ._gemm_common import as_2d, compute_pid, gemm_configs, linear_ref, m_bucket, prune, store_tile
from .aot import AotCase, gemm_signature
from .bitmap_cpu import bitmap_mm_cpu
from .dtypes import FLOAT_DTYPES
from .mask_bits import pack_mask, unpack_bits
from .sparse24 import dot_precision

TILE_K = 64  # columns per offset; the kernel's BLOCK_K equals it, so one offset load per tile row


@triton.autotune(
    configs=gemm_configs(block_k=TILE_K),
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": prune},
)
@triton.jit
def _bitmap_mm_kernel(
    x_ptr,
    v_ptr,
    mask_ptr,
    off_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_mn,
    stride_on,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    # BLOCK_K == TILE_K: K tile t of this loop is exactly offsets[:, t] of the format.
    pid_m, pid_n = compute_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K // 8)
    shifts = tl.arange(0, 8)
    m_ok = rm[:, None] < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        kk = t * BLOCK_K + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok & (kk[None, :] < K))
        start = tl.load(off_ptr + rn * stride_on + t, mask=n_ok, other=0)
        mc = t * (BLOCK_K // 8) + rb
        ok = n_ok[:, None] & (mc[None, :] < (K + 7) // 8)
        byte = tl.load(mask_ptr + rn[:, None] * stride_mn + mc[None, :], mask=ok, other=0).to(tl.int32)
        bits = tl.reshape((byte[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_N, BLOCK_K))
        rank = tl.cumsum(bits, axis=1) - bits  # exclusive prefix sum: slot of each kept weight
        w = tl.load(v_ptr + start[:, None] + rank, mask=bits != 0, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    store_tile(acc, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


def compress_bitmap(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (values [nnz], mask_bits [N, ceil(K/8)] uint8, offsets [N, ceil(K/64)] int32)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    check_dtype("weight", weight, FLOAT_DTYPES)
    rows, cols = weight.shape
    mask = weight != 0
    tiles = (cols + TILE_K - 1) // TILE_K
    counts = F.pad(mask, (0, tiles * TILE_K - cols)).view(rows, tiles, TILE_K).sum(-1, dtype=torch.int64)
    ends = counts.reshape(-1).cumsum(0)
    if rows * cols and int(ends[-1]) >= 2**31:
        raise ValueError(f"{int(ends[-1])} nonzeros overflow the int32 offsets; split the weight by rows")
    offsets = (ends - counts.reshape(-1)).to(torch.int32).view(rows, tiles)
    return weight[mask], pack_mask(mask), offsets


def check_format(values, mask_bits, offsets, in_features: int) -> None:
    """Raise a ValueError naming the fix when (values, mask_bits, offsets) are not a bitmap of width K."""
    check_dtype("values", values, FLOAT_DTYPES)
    check_dtype("mask_bits", mask_bits, (torch.uint8,))
    check_dtype("offsets", offsets, (torch.int32,))
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D [nnz], got shape {tuple(values.shape)}")
    rows = mask_bits.shape[0] if mask_bits.dim() == 2 else -1
    want_mask, want_off = (rows, (in_features + 7) // 8), (rows, (in_features + TILE_K - 1) // TILE_K)
    if mask_bits.dim() != 2 or tuple(mask_bits.shape) != want_mask:
        raise ValueError(
            f"mask_bits must be [N, ceil(K/8)] = {want_mask} for K = {in_features}, "
            f"got {tuple(mask_bits.shape)}"
        )
    if tuple(offsets.shape) != want_off:
        raise ValueError(
            f"offsets must be [N, ceil(K/64)] = {want_off} for K = {in_features}, got {tuple(offsets.shape)}"
        )


def decompress_bitmap(
    values: torch.Tensor, mask_bits: torch.Tensor, offsets: torch.Tensor, in_features: int
) -> torch.Tensor:
    """(values, mask_bits, offsets) -> dense weight [N, in_features] with zeros (one masked_scatter)."""
    check_format(values, mask_bits, offsets, in_features)
    mask = unpack_bits(mask_bits, in_features)
    return values.new_zeros(mask.shape).masked_scatter_(mask, values)


def decompress_bitmap_ref(
    values: torch.Tensor, mask_bits: torch.Tensor, offsets: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Reference that reads every tile through its offset, as the kernel does."""
    check_format(values, mask_bits, offsets, in_features)
    rows = mask_bits.shape[0]
    mask = unpack_bits(mask_bits, in_features)
    dense = values.new_zeros(rows, in_features)
    for n in range(rows):
        for t in range(offsets.shape[1]):
            cols = mask[n, t * TILE_K : (t + 1) * TILE_K].nonzero().flatten() + t * TILE_K
            start = int(offsets[n, t])
            dense[n, cols] = values[start : start + cols.numel()]
    return dense


def _check_mm(x, values, mask_bits, offsets, bias) -> None:
    check_dtype("x", x, FLOAT_DTYPES)
    check_same_device(x=x, values=values, mask_bits=mask_bits, offsets=offsets, bias=bias)
    if x.dim() < 1:
        raise ValueError("x must be [..., K]")
    check_format(values, mask_bits, offsets, x.shape[-1])
    if values.dtype != x.dtype:
        raise ValueError(f"x and values must share a dtype, got {x.dtype} and {values.dtype}; cast one")
    n = mask_bits.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [N] = [{n}] of {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def _bitmap_mm_triton(x, values, mask_bits, offsets, bias, interpret_config=None):
    x2 = as_2d(x)
    m, k = x2.shape
    n = mask_bits.shape[0]
    mask_bits, offsets = mask_bits.contiguous(), offsets.contiguous()
    if values.numel() == 0:  # 100% sparse: every load is masked off, but the pointer must be real
        values = values.new_zeros(1)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    cfg = interpret_config or {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": TILE_K}
    if cfg["BLOCK_K"] != TILE_K:
        raise ValueError(f"bitmap_mm needs BLOCK_K == TILE_K == {TILE_K}, got {cfg['BLOCK_K']}")
    launch(
        _bitmap_mm_kernel,
        grid,
        cfg,
        x2,
        values,
        mask_bits,
        offsets,
        bias if bias is not None else y,  # placeholder pointer, never read when HAS_BIAS is False
        y,
        m,
        n,
        k,
        m_bucket(m),
        x2.stride(0),
        x2.stride(1),
        mask_bits.stride(0),
        offsets.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("sparsekit::bitmap_mm", mutates_args=())
def _bitmap_mm_op(
    x: torch.Tensor,
    values: torch.Tensor,
    mask_bits: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    triton: bool,
) -> torch.Tensor:
    if triton:
        return _bitmap_mm_triton(x, values, mask_bits, offsets, bias)
    if x.device.type == "cpu":  # direct kernel at decode, decompressed tiles + GEMM above
        return bitmap_mm_cpu(x, values, mask_bits, offsets, bias)
    return F.linear(x, decompress_bitmap(values, mask_bits, offsets, x.shape[-1]), bias)


@_bitmap_mm_op.register_fake
def _(x, values, mask_bits, offsets, bias, triton):
    return x.new_empty((*x.shape[:-1], mask_bits.shape[0]))


def bitmap_mm(
    x: torch.Tensor,
    values: torch.Tensor,
    mask_bits: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W.T + bias with W given as ``compress_bitmap(W)``.

    ``backend``: None follows ``use_backend`` / the default (see ``sparsekit.kernels.Backend``).
    """
    _check_mm(x, values, mask_bits, offsets, bias)
    triton = use_triton(x, values, mask_bits, offsets, backend=backend)
    if not triton and cpu_op_applies(x, values, bias):
        route = cpu_ext.route_args("bitmap", x.dtype, x.shape[-1])
        return torch.ops.sparsekit.bitmap_routed(x, values, mask_bits, offsets, bias, *route)
    return torch.ops.sparsekit.bitmap_mm(x, values, mask_bits, offsets, bias, triton)


def bitmap_mm_ref(
    x: torch.Tensor,
    values: torch.Tensor,
    mask_bits: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference: decompress through the offsets, fp32 matmul, cast back."""
    _check_mm(x, values, mask_bits, offsets, bias)
    return linear_ref(x, decompress_bitmap_ref(values, mask_bits, offsets, x.shape[-1]), bias)


AOT_CASES = [
    AotCase.gemm(
        f"bitmap_mm-{label}-{dtype}",
        _bitmap_mm_kernel,
        gemm_signature(
            ["x_ptr", "v_ptr", "mask_ptr", "off_ptr", "bias_ptr", "y_ptr"],
            ["M", "N", "K", "M_BUCKET", "stride_xm", "stride_mn", "stride_on", "stride_ym"],
            dtype,
            pointer_types={"mask_ptr": "*u8", "off_ptr": "*i32"},
        ),
        blocks,
        warps,
        stages,
        stride_xk=1,
        HAS_BIAS=True,
        DOT_PRECISION="tf32",
    )
    for label, dtype, blocks, warps, stages in (
        ("decode", "fp16", (16, 64, TILE_K), 4, 4),
        ("prefill", "fp16", (128, 128, TILE_K), 8, 3),
        ("prefill", "bf16", (128, 128, TILE_K), 8, 3),
    )
]
