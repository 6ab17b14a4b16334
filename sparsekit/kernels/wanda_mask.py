"""Wanda mask: keep the largest |W| * ||X||_2 per output row (or top n of every m columns).

weight [N, K] (fp32/fp16/bf16), act_norm [K] fp32 (l2 norm of each input channel over the
calibration tokens) -> mask_bits [N, ceil(K/8)] uint8 (unpack with ``unpack_mask``).
Ties break toward the lower column index, so the mask is deterministic and every backend
must equal ``wanda_mask_ref`` bit for bit.
"""

from __future__ import annotations

import torch

from ._backend import check_same_device
from .mask_bits import pack_mask
from .topk_select import keep_count, nm_keep_mask, topk_keep_mask


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


def _check_inputs(weight: torch.Tensor, act_norm: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    if act_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"act_norm must be [in_features] = [{weight.shape[1]}], got shape {tuple(act_norm.shape)}"
        )
    check_same_device(weight=weight, act_norm=act_norm)
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


def wanda_mask(
    weight: torch.Tensor,
    act_norm: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> torch.Tensor:
    """Wanda mask, packed: mask_bits [N, ceil(K/8)] uint8 (True = keep)."""
    return pack_mask(wanda_mask_torch(weight, act_norm, sparsity, n, m))
