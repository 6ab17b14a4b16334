"""Exact top-k selection along the last dim, the rule every sparsekit mask follows.

Keep exactly ``keep`` entries of each row: the largest scores win, and among equal scores
the lower column index wins. Pure torch (O(K) per row via kthvalue, no full sort).
"""

from __future__ import annotations

import torch


def topk_keep_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [..., K] float -> bool mask [..., K] with exactly ``keep`` True per row.

    Ties at the threshold are broken toward the lower index (stable, deterministic).
    """
    size = scores.shape[-1]
    if not 0 <= keep <= size:
        raise ValueError(f"keep must be in [0, {size}], got {keep}")
    if keep == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if keep == size:
        return torch.ones_like(scores, dtype=torch.bool)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: check the weights and activation statistics for NaN/inf")
    # keep-th largest == (size - keep + 1)-th smallest
    threshold = scores.kthvalue(size - keep + 1, dim=-1, keepdim=True).values
    above = scores > threshold
    at = scores == threshold
    room = keep - above.sum(dim=-1, keepdim=True)
    return above | (at & (at.cumsum(dim=-1) <= room))


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """scores [R, K] -> bool mask [R, K] keeping the top ``n`` of every ``m`` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features % {m} == 0, got {cols}")
    grouped = scores.reshape(rows, cols // m, m)
    # descending stable sort keeps the lower index first among ties; m is tiny so this is cheap
    order = grouped.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(rows, cols)


def keep_count(size: int, sparsity: float) -> int:
    """Entries kept in a group of ``size`` at ``sparsity``: size - floor(size * sparsity)."""
    return size - int(size * sparsity)
