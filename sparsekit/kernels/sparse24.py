"""2:4 compressed weights and the GEMM that reads them.

Format (``compress_24``), for weight [N, K] with K % 4 == 0 and G = K / 4 groups per row:
  values [N, K/2]   same dtype as the weight: the two kept entries of each group, in column order
  meta   [N, ceil(K/8)] uint8: one 4-bit nibble per group (group g in byte g // 2, low nibble for
         even g); nibble = i0 | i1 << 2 with i0 < i1 the kept positions inside the group.
That is 0.125 bytes of metadata per weight: fp16/bf16 cost 1.125 bytes per weight instead of 2.

``sparse24_mm``: x [..., K] (fp16/bf16/fp32), values [N, K/2], meta [N, ceil(K/8)] uint8,
bias [N] or None -> y [..., N] = x @ decompress_24(values, meta).T + bias, fp32 accumulation.
The Triton kernel loads compressed tiles and expands them in registers before ``tl.dot``; it
cannot use sparse tensor cores (upstream Triton has no sparse MMA), so it wins where the weight
stream dominates (decode); for compute-bound M use cuSPARSELt (see docs/kernels.md).
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
from .dtypes import FLOAT_DTYPES
from .sparse24_cpu import decompress_24_torch, decompress_rows, sparse24_mm_cpu


# ----------------------------------------------------------------------------- kernel
@triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": prune},
)
@triton.jit
def _sparse24_mm_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_vn,
    stride_mn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8,
):
    # BLOCK_K % 8 == 0: every K tile holds whole meta bytes, so no 2:4 group straddles two tiles.
    pid_m, pid_n = compute_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rv = tl.arange(0, BLOCK_K // 2)
    rb = tl.arange(0, BLOCK_K // 8)
    half_k = K // 2
    meta_cols = (K + 7) // 8
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok & (kk[None, :] < K))
        vc = k0 // 2 + rv
        v = tl.load(
            v_ptr + rn[:, None] * stride_vn + vc[None, :], mask=n_ok & (vc[None, :] < half_k), other=0.0
        )
        mc = k0 // 8 + rb
        mb = tl.load(meta_ptr + rn[:, None] * stride_mn + mc[None, :], mask=n_ok & (mc[None, :] < meta_cols))
        mb = mb.to(tl.int32)
        nib = tl.reshape(tl.join(mb & 15, mb >> 4), (BLOCK_N, BLOCK_K // 4))  # nibble of each group
        i0 = nib & 3
        i1 = nib >> 2
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
        zero = tl.zeros_like(v0)
        o0 = tl.where(i0 == 0, v0, zero)
        o1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        o2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        o3 = tl.where(i1 == 3, v1, zero)
        # join(join(o0, o2), join(o1, o3))[n, g, a, b] = o_{2a+b}: row-major reshape restores K order
        w = tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BLOCK_N, BLOCK_K))
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    store_tile(acc, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


# ----------------------------------------------------------------------------- format
def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    check_dtype("weight", weight, FLOAT_DTYPES)
    if weight.shape[1] % 4:
        raise ValueError(f"2:4 needs in_features % 4 == 0, got {weight.shape[1]}")


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] with at most 2 nonzeros per group of 4 -> (values [N, K/2], meta [N, ceil(K/8)] uint8).

    A group with fewer than 2 nonzeros keeps its nonzeros and fills up with its lowest zero
    slots, so the result is deterministic. A weight that is not 2:4 raises a ValueError naming
    the first offending row and group.
    """
    _check_weight(weight)
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    bad = nonzero.sum(-1) > 2
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"weight is not 2:4: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) has "
            f"{int(nonzero[r, g].sum())} nonzeros; prune it first (e.g. nm_keep_mask(scores, 2, 4))"
        )
    # rank slots: nonzeros first, then zeros, each in column order; keep the first two, sorted
    rank = (~nonzero).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8, device=weight.device)
    idx = rank.topk(2, dim=-1, largest=False).indices.sort(dim=-1).values
    values = groups.gather(-1, idx).reshape(rows, cols // 2)
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, G]
    if nib.shape[1] % 2:
        nib = F.pad(nib, (0, 1))
    nib = nib.view(rows, -1, 2)
    meta = nib[..., 0] | (nib[..., 1] << 4)
    return values.contiguous(), meta.contiguous()


def check_24_layout(values: torch.Tensor, meta: torch.Tensor) -> None:
    """Raise a ValueError unless values [N, K/2] (float) and meta [N, ceil(K/8)] uint8 fit together."""
    if values.dim() != 2 or meta.dim() != 2:
        raise ValueError(
            f"need values [N, K/2] and meta [N, ceil(K/8)], got {tuple(values.shape)} and {tuple(meta.shape)}"
        )
    check_dtype("values", values, FLOAT_DTYPES)
    check_dtype("meta", meta, (torch.uint8,))
    rows, half = values.shape
    if half % 2:
        raise ValueError(f"values must be [N, K/2] with K % 4 == 0, got {half} columns (K = {2 * half})")
    if tuple(meta.shape) != (rows, (2 * half + 7) // 8):
        raise ValueError(
            f"meta shape {tuple(meta.shape)} does not fit values {tuple(values.shape)}: "
            f"expected ({rows}, {(2 * half + 7) // 8}) for K = {2 * half}"
        )


def _group_indices(meta: torch.Tensor, groups: int) -> torch.Tensor:
    """meta [N, ceil(K/8)] uint8 -> kept positions [N, G, 2] int64."""
    nib = torch.stack((meta & 15, meta >> 4), dim=-1).reshape(meta.shape[0], -1)[:, :groups]
    return torch.stack((nib & 3, nib >> 2), dim=-1).long()


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta [N, ceil(K/8)] uint8) -> dense weight [N, K] with zeros.

    CPU: the vectorized expansion of sparse24_cpu (its traceable torch form under torch.compile,
    so a compiled graph never breaks on the C++ call); elsewhere one scatter.
    """
    check_24_layout(values, meta)
    rows, half = values.shape
    if values.device.type == "cpu":
        if torch.compiler.is_compiling():
            return decompress_24_torch(values, meta)
        return decompress_rows(values, meta, 0, rows)
    idx = _group_indices(meta, half // 2)
    dense = values.new_zeros(rows, half // 2, 4)
    return dense.scatter_(-1, idx, values.reshape(rows, half // 2, 2)).reshape(rows, 2 * half)


def decompress_24_ref(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Plain reference of decompress_24: one where() per slot of the group."""
    check_24_layout(values, meta)
    rows, half = values.shape
    idx = _group_indices(meta, half // 2)
    v = values.reshape(rows, half // 2, 2)
    zero = torch.zeros((), dtype=values.dtype)
    slots = [
        torch.where(idx[..., 0] == p, v[..., 0], torch.where(idx[..., 1] == p, v[..., 1], zero))
        for p in range(4)
    ]
    return torch.stack(slots, dim=-1).reshape(rows, 2 * half)


# ----------------------------------------------------------------------------- GEMM
def _check_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_24_layout(values, meta)
    check_dtype("x", x, FLOAT_DTYPES)
    check_same_device(x=x, values=values, meta=meta, bias=bias)
    k = 2 * values.shape[1]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., K] with K = 2 * values.shape[1] = {k}, got shape {tuple(x.shape)}")
    if values.dtype != x.dtype:
        raise ValueError(f"x and values must share a dtype, got {x.dtype} and {values.dtype}; cast one")
    if bias is not None and (bias.shape != (values.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(
            f"bias must be [N] = [{values.shape[0]}] of {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: TF32 only where torch allows it for matmuls, else exact IEEE fp32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _sparse24_mm_triton(x, values, meta, bias, interpret_config=None):
    x2 = as_2d(x)
    m, k = x2.shape
    n = values.shape[0]
    values, meta = values.contiguous(), meta.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)
    cfg = interpret_config or {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}
    launch(
        _sparse24_mm_kernel,
        grid,
        cfg,
        x2,
        values,
        meta,
        bias if bias is not None else y,  # placeholder pointer, never read when HAS_BIAS is False
        y,
        m,
        n,
        k,
        m_bucket(m),
        x2.stride(0),
        x2.stride(1),
        values.stride(0),
        meta.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return y.reshape(*x.shape[:-1], n)


def _sparse24_mm_torch(x, values, meta, bias):
    if x.device.type == "cpu":  # direct kernel at decode, blocked decompress + GEMM above
        return sparse24_mm_cpu(x, values, meta, bias)
    return F.linear(x, decompress_24(values, meta), bias)


@torch.library.custom_op("sparsekit::sparse24_mm", mutates_args=())
def _sparse24_mm_op(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, triton: bool
) -> torch.Tensor:
    if triton:
        return _sparse24_mm_triton(x, values, meta, bias)
    return _sparse24_mm_torch(x, values, meta, bias)


@_sparse24_mm_op.register_fake
def _(x, values, meta, bias, triton):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def sparse24_mm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W.T + bias, W 2:4-compressed: values [N, K/2], meta [N, ceil(K/8)].

    ``backend``: None follows ``use_backend`` / the default (see ``sparsekit.kernels.Backend``).
    """
    _check_mm(x, values, meta, bias)
    triton = use_triton(x, values, meta, backend=backend)
    if not triton and cpu_op_applies(x, values, bias):
        route = cpu_ext.route_args("2:4", x.dtype, x.shape[-1])
        return torch.ops.sparsekit.mm24_routed(x, values, meta, bias, *route)
    return torch.ops.sparsekit.sparse24_mm(x, values, meta, bias, triton)


def sparse24_mm_ref(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Eager reference: plain decompress, fp32 matmul, cast back."""
    _check_mm(x, values, meta, bias)
    return linear_ref(x, decompress_24_ref(values, meta), bias)


# representative configs for `python -m sparsekit.kernels.aot`: one decode, one prefill, bf16 prefill
AOT_CASES = [
    AotCase.gemm(
        f"sparse24_mm-{label}-{dtype}",
        _sparse24_mm_kernel,
        gemm_signature(
            ["x_ptr", "v_ptr", "meta_ptr", "bias_ptr", "y_ptr"],
            ["M", "N", "K", "M_BUCKET", "stride_xm", "stride_vn", "stride_mn", "stride_ym"],
            dtype,
            pointer_types={"meta_ptr": "*u8"},
        ),
        blocks,
        warps,
        stages,
        stride_xk=1,
        HAS_BIAS=True,
        DOT_PRECISION="tf32",
    )
    for label, dtype, blocks, warps, stages in (
        ("decode", "fp16", (16, 64, 128), 4, 4),
        ("prefill", "fp16", (128, 128, 64), 8, 3),
        ("prefill", "bf16", (128, 128, 64), 8, 3),
    )
]
