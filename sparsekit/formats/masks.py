"""Masks from scores under a pattern, and checks that a mask obeys its pattern. True = keep."""

from __future__ import annotations

import torch

from sparsekit.kernels import keep_count, nm_keep_mask, topk_keep_mask

from .patterns import NMPattern, Pattern, Unstructured


def pattern_mask(scores: torch.Tensor, pattern: Pattern, group: str = "row") -> torch.Tensor:
    """scores [R, K] -> bool mask [R, K] keeping the highest scores.

    Unstructured: exactly ``K - floor(K * sparsity)`` kept per row (``group='row'``) or
    ``R*K - floor(R*K*sparsity)`` over the whole matrix (``group='matrix'``). N:M: top N of every
    M consecutive columns. Ties go to the lower index.
    """
    if isinstance(pattern, NMPattern):
        pattern.check_columns(scores.shape[1])
        return nm_keep_mask(scores, pattern.keep, pattern.group)
    if group == "row":
        return topk_keep_mask(scores, keep_count(scores.shape[1], pattern.sparsity))
    if group == "matrix":
        flat = scores.reshape(-1)
        return topk_keep_mask(flat, keep_count(flat.numel(), pattern.sparsity)).reshape(scores.shape)
    raise ValueError(f"group must be 'row' or 'matrix', got {group!r}")


def mask_sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned (False) entries."""
    return 1.0 - mask.float().mean().item()


def check_mask(mask: torch.Tensor, pattern: Pattern) -> None:
    """Raise if an N:M mask has a group with more than N kept, naming the first bad row and group."""
    if isinstance(pattern, Unstructured):
        return
    rows, cols = mask.shape
    pattern.check_columns(cols)
    kept = mask.reshape(rows, cols // pattern.group, pattern.group).sum(dim=-1)
    bad = (kept > pattern.keep).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise ValueError(f"mask breaks {pattern}: row {r}, group {g} keeps {kept[r, g].item()} entries")
