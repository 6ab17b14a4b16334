"""SparseGPT's OBS update inside one column block (rows are independent given Hinv).

w [R, B] fp32 (the block of the weight, already updated by earlier blocks), hinv [B, B] fp32
(the block of the upper Cholesky factor of H^-1) -> (q [R, B] pruned block,
err [R, B] scaled errors (w_i - q_i) / hinv[i, i] for the cross-block GEMM, mask [R, B] bool).

Mask rule: unstructured keeps ``B*R - floor(B*R*sparsity)`` entries of the whole block with the
largest w^2 / hinv_ii^2 (ties -> lower flat index); N:M keeps the top n of every m columns,
chosen when the solve reaches the group's first column.

Triton kernel (CUDA): one program solves BLOCK_R rows of the block, holding w [BLOCK_R, B] in
registers and walking the B columns in order (rank-1 updates with rows of hinv); the N:M choice
is made in the kernel at each group's first column. The unstructured mask is a joint top-k over
the whole [R, B] block, which no single program sees, so torch computes it before the launch
(``_block_unstructured_mask``) and the kernel reads it. The per-column update is a rank-1
update, not a GEMM, so the kernel issues no tl.dot (no tensor cores); the cross-block update
stays a cuBLAS GEMM in ``sparsegpt_solve``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from .aot import AotCase
from .quant import round_to_grid
from .topk_select import keep_count, kth_smallest, nm_keep_mask, topk_keep_mask


@triton.jit
def _obs_block_kernel(
    w_ptr,
    hinv_ptr,
    mask_ptr,
    q_ptr,
    err_ptr,
    R,
    B,
    stride_wr,
    stride_h,
    stride_mr,
    stride_or,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # w [R, B] fp32, hinv [B, B] fp32 upper -> q, err [R, B] fp32; mask [R, B] uint8 is read
    # (unstructured, NM_M == 0) or written (N:M). BLOCK_B >= B: the whole block row is in registers.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_B)
    ok = (rows[:, None] < R) & (cols[None, :] < B)
    w = tl.load(w_ptr + rows[:, None] * stride_wr + cols[None, :], mask=ok, other=0.0)
    diag = tl.load(hinv_ptr + cols * (stride_h + 1), mask=cols < B, other=1.0)
    m_ptrs = mask_ptr + rows[:, None] * stride_mr + cols[None, :]
    if NM_M == 0:
        keep = tl.load(m_ptrs, mask=ok, other=0) != 0
    else:
        keep = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int1)
    q = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    err = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    for i in range(0, B):
        at_i = cols[None, :] == i
        if NM_M != 0:
            if i % NM_M == 0:  # choose the group's n keepers from the current weights
                sal = w * w / (diag * diag)[None, :]
                in_group = (cols[None, :] >= i) & (cols[None, :] < i + NM_M)
                beaten = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int32)
                for j in tl.static_range(NM_M):
                    s_j = tl.sum(tl.where(cols[None, :] == i + j, sal, 0.0), axis=1)[:, None]
                    beats = (s_j > sal) | ((s_j == sal) & (i + j < cols[None, :]))
                    beaten += beats.to(tl.int32)
                keep = tl.where(in_group, beaten < NM_N, keep)
        col = tl.sum(tl.where(at_i, w, 0.0), axis=1)  # w[:, i] as updated by columns < i
        kept = tl.sum(tl.where(at_i & keep, 1, 0), axis=1) != 0
        d_i = tl.sum(tl.where(cols == i, diag, 0.0), axis=0)
        q_i = tl.where(kept, col, 0.0)
        e_i = (col - q_i) / d_i
        q = tl.where(at_i, q_i[:, None], q)
        err = tl.where(at_i, e_i[:, None], err)
        h_row = tl.load(hinv_ptr + i * stride_h + cols, mask=(cols > i) & (cols < B), other=0.0)
        w = w - e_i[:, None] * h_row[None, :]
    o_off = rows[:, None] * stride_or + cols[None, :]
    tl.store(q_ptr + o_off, q, mask=ok)
    tl.store(err_ptr + o_off, err, mask=ok)
    if NM_M != 0:
        tl.store(m_ptrs, keep.to(tl.uint8), mask=ok)


def _block_unstructured_mask(w: torch.Tensor, diag: torch.Tensor, sparsity: float) -> torch.Tensor:
    saliency = w.square() / diag.square().unsqueeze(0)
    keep = keep_count(saliency.numel(), sparsity)
    return topk_keep_mask(saliency.reshape(-1), keep).reshape(w.shape)


def _check_step(w: torch.Tensor, step: torch.Tensor | None, bits: int) -> None:
    if step is None:
        return
    if step.shape != w.shape or step.dtype != torch.float32:
        raise ValueError(
            f"step must be fp32 {tuple(w.shape)} like the weights, got {step.dtype} {tuple(step.shape)}"
        )
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8 with a step, got {bits}")


def _check(w: torch.Tensor, hinv: torch.Tensor, sparsity, n, m, mask=None) -> None:
    if w.dim() != 2 or hinv.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"need w [R, B] and hinv [B, B], got {tuple(w.shape)} and {tuple(hinv.shape)}")
    if (sparsity is not None) + (n is not None) + (mask is not None) != 1:
        raise ValueError("give exactly one of sparsity, n and m, or a fixed mask")
    if mask is not None and (mask.shape != w.shape or mask.dtype != torch.bool):
        raise ValueError(f"a fixed mask must be bool {tuple(w.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if n is not None and w.shape[1] % m:
        raise ValueError(f"block width {w.shape[1]} must be a multiple of m={m} so no group straddles blocks")


def obs_block_solve_ref(
    w: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    mask: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    bits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain per-column loop, as in the SparseGPT paper's Algorithm 1 for one block.

    ``mask`` [R, B] bool: a fixed keep-mask (the OBS update of the kept weights only). ``step``
    [R, B] fp32 with ``bits``: the paper's joint mode, each kept weight rounded to its symmetric
    ``bits``-bit grid (``round_to_grid``) before its error is spread over the later columns."""
    _check(w, hinv, sparsity, n, m, mask)
    _check_step(w, step, bits)
    w = w.clone()
    rows, width = w.shape
    q = torch.zeros_like(w)
    err = torch.zeros_like(w)
    diag = torch.diagonal(hinv)
    mask = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.clone()
    if sparsity is not None:
        mask = _block_unstructured_mask(w, diag, sparsity)
    for i in range(width):
        if n is not None and i % m == 0:
            mask[:, i : i + m] = nm_keep_mask(w[:, i : i + m].square() / diag[i : i + m].square(), n, m)
        col = w[:, i]
        q[:, i] = col * mask[:, i]
        if step is not None:
            q[:, i] = round_to_grid(q[:, i], step[:, i], bits)
        err[:, i] = (col - q[:, i]) / diag[i]
        w[:, i:] -= err[:, i : i + 1] * hinv[i : i + 1, i:]
    return q, err, mask


def nm_keep_rows(saliency_t: torch.Tensor, n: int) -> torch.Tensor:
    """saliency_t [m, R] (one N:M group, columns as rows) -> bool [m, R] keeping the top n per column.

    Rank by counting, no sort: j is kept when fewer than n entries beat it, where l beats j if
    s_l > s_j, or s_l == s_j and l < j (the stable descending sort of ``nm_keep_mask``).
    """
    m = saliency_t.shape[0]
    s_l, s_j = saliency_t.unsqueeze(1), saliency_t.unsqueeze(0)  # [m, 1, R], [1, m, R]
    lower = torch.ones(m, m, dtype=torch.bool, device=saliency_t.device).tril(-1).T  # [l, j]: l < j
    beats = (s_l > s_j) | ((s_l == s_j) & lower.unsqueeze(-1))
    return beats.sum(dim=0) < n


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Run CPU ops single-threaded: the per-column ops are too small to gain from a fork/join,
    and on a busy machine each one waits for a descheduled OpenMP thread (100x slower measured
    on 2 shared cores). The cross-block GEMM, outside, keeps every thread."""
    prev = torch.get_num_threads()
    if device.type != "cpu" or prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def obs_block_solve_t_(
    wt: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    sub_block: int = 16,
    maskt: torch.Tensor | None = None,
    step_t: torch.Tensor | None = None,
    bits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place transposed solve: wt [B, R] contiguous fp32 -> q (in wt), returns (errt, maskt) [B, R].
    ``step_t`` [B, R] with ``bits``: the joint mode of ``obs_block_solve_ref``.

    The CPU fast path behind ``obs_block_solve_torch`` and ``sparsegpt_solve``. Columns are
    solved in sub-blocks of ``sub_block`` (a multiple of m): rank-1 updates touch only the
    sub-block, the rest of the block gets one GEMM per sub-block (the paper's lazy batch update,
    applied a second time). On w^T each column is a contiguous row, and each column costs two
    ops: err_i = w_i / denom_i with denom = hinv_ii where pruned and inf where kept (so err is
    bit-identical to the reference's (w_i - q_i) / hinv_ii), and one ``addr_``.
    """
    diag = torch.diagonal(hinv)
    inf = torch.tensor(float("inf"), dtype=wt.dtype, device=wt.device)
    # whole-block elementwise work with every thread; only the column loop runs on one
    if maskt is None and sparsity is not None:
        maskt = _unstructured_keep_t(wt.square().div_(diag.square().unsqueeze(1)), sparsity)
    if maskt is not None:  # chosen above, or a given keep-mask [B, R]: only the update runs
        denom = torch.where(maskt, inf, diag.unsqueeze(1))
    else:
        maskt = torch.empty_like(wt, dtype=torch.bool)
        denom = torch.empty_like(wt)
    with one_thread(wt.device):
        errt = _solve_t(wt, hinv, diag, inf, maskt, denom, n, m, sub_block, step_t, bits)
    wt.mul_(maskt)
    return errt, maskt


def _unstructured_keep_t(saliency_t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """saliency_t [B, R] -> keep-mask [B, R]: the joint top-k of the [R, B] block, ties to the
    lower index in the reference's row-major [R, B] order. The threshold does not depend on the
    order, so the transpose is only paid when a tie straddles it."""
    flat = saliency_t.reshape(-1)
    keep = keep_count(flat.numel(), sparsity)
    if keep in (0, flat.numel()):
        return torch.full_like(saliency_t, keep > 0, dtype=torch.bool)
    if torch.isnan(flat).any():
        raise ValueError("saliency contains NaN: check the weights and the Hessian for NaN/inf")
    threshold = kth_smallest(flat, flat.numel() - keep + 1)
    above = saliency_t > threshold
    at = saliency_t == threshold
    room = keep - int(above.sum())
    if int(at.sum()) == room:
        return above | at
    at_rb = at.T.reshape(-1)
    return above | (at_rb & (at_rb.cumsum(0) <= room)).view(at.shape[1], at.shape[0]).T


def _solve_t(wt, hinv, diag, inf, maskt, denom, n, m, sub_block, step_t=None, bits=0):
    width = wt.shape[0]
    if n is not None:
        sub_block = max(m, sub_block - sub_block % m)
    errt = torch.empty_like(wt)
    qmax = 2 ** (bits - 1) - 1
    q = torch.empty_like(wt[0])
    for s0 in range(0, width, sub_block):
        s1 = min(s0 + sub_block, width)
        for i in range(s0, s1):
            if n is not None and i % m == 0:
                group = slice(i, i + m)
                saliency = wt[group].square() / diag[group, None].square()
                maskt[group] = nm_keep_rows(saliency, n)
                torch.where(maskt[group], inf, diag[group, None], out=denom[group])
            if step_t is None:
                torch.div(wt[i], denom[i], out=errt[i])
            else:  # joint mode: the kept weight goes to its grid point, the rounding error spreads too
                torch.div(wt[i], step_t[i], out=q).round_().clamp_(-qmax, qmax).mul_(step_t[i]).mul_(maskt[i])
                torch.sub(wt[i], q, out=errt[i]).div_(diag[i])
                wt[i].copy_(q)
            if i + 1 < s1:
                wt[i + 1 : s1].addr_(hinv[i, i + 1 : s1], errt[i], alpha=-1.0)
        if s1 < width:
            wt[s1:].addmm_(hinv[s0:s1, s1:].T, errt[s0:s1], alpha=-1.0)
    return errt


def obs_block_solve_torch(
    w: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    sub_block: int = 16,
    mask: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    bits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same result as the reference, faster: ``obs_block_solve_t_`` on a transposed copy."""
    _check(w, hinv, sparsity, n, m, mask)
    _check_step(w, step, bits)
    wt = w.T.clone(memory_format=torch.contiguous_format)  # [B, R]: column i of w is row i
    fixed = None if mask is None else mask.T.contiguous()
    step_t = None if step is None else step.T.contiguous()
    errt, maskt = obs_block_solve_t_(wt, hinv, sparsity, n, m, sub_block, fixed, step_t, bits)
    return wt.T.contiguous(), errt.T.contiguous(), maskt.T.contiguous()


def obs_block_solve_triton(
    w: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    block_r: int | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel; the unstructured per-block mask is chosen by torch before the launch
    (or given: ``mask`` [R, B] bool, read by the kernel as the unstructured one is)."""
    _check(w, hinv, sparsity, n, m, mask)
    rows, width = w.shape
    if width > 256:
        raise ValueError(f"the Triton block solve keeps rows in registers: use blocksize <= 256, got {width}")
    w = w.float().contiguous()
    hinv = hinv.float().contiguous()
    mask_given = mask is not None
    if mask is not None:
        mask = mask.to(torch.uint8).contiguous()
    elif sparsity is not None:
        mask = _block_unstructured_mask(w, torch.diagonal(hinv), sparsity).to(torch.uint8)
    else:
        mask = torch.empty((rows, width), dtype=torch.uint8, device=w.device)
    q, err = torch.empty_like(w), torch.empty_like(w)
    block_b = triton.next_power_of_2(width)
    block_r = block_r or max(1, min(16, 2048 // block_b))  # ~16 fp32 registers of w per thread at 4 warps
    _obs_block_kernel[(triton.cdiv(rows, block_r),)](
        w,
        hinv,
        mask,
        q,
        err,
        rows,
        width,
        w.stride(0),
        hinv.stride(0),
        mask.stride(0),
        q.stride(0),
        NM_N=0 if mask_given else n or 0,
        NM_M=0 if mask_given else m or 0,
        BLOCK_R=block_r,
        BLOCK_B=block_b,
        num_warps=4,
    )
    return q, err, mask.bool()


def obs_block_solve(
    w: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, B] fp32, hinv [B, B] fp32 -> (q, err, mask) [R, B]: Triton on CUDA, blocked torch on CPU.

    ``mask`` [R, B] bool: a fixed keep-mask instead of choosing one (sparsity / n:m)."""
    if use_triton(w, hinv):
        return obs_block_solve_triton(w, hinv, sparsity, n, m, mask=mask)
    return obs_block_solve_torch(w, hinv, sparsity, n, m, mask=mask)


_OBS_SIG = {
    "w_ptr": "*fp32",
    "hinv_ptr": "*fp32",
    "mask_ptr": "*u8",
    "q_ptr": "*fp32",
    "err_ptr": "*fp32",
    "R": "i32",
    "B": "i32",
    "stride_wr": "i32",
    "stride_h": "i32",
    "stride_mr": "i32",
    "stride_or": "i32",
}
# blocksize 128 (SparseGPT's default): unstructured and 2:4, BLOCK_R as the wrapper picks it
AOT_CASES = [
    AotCase(
        f"obs_block_solve-{label}",
        _obs_block_kernel,
        _OBS_SIG,
        {"NM_N": nm_n, "NM_M": nm_m, "BLOCK_R": 16, "BLOCK_B": 128},
        is_gemm=False,
        num_warps=4,
        num_stages=1,
        aligned=tuple(_OBS_SIG),
    )
    for label, nm_n, nm_m in (("unstructured", 0, 0), ("2of4", 2, 4))
]
