"""Magnitude pruning: keep the largest |W| (per layer for unstructured, per group for N:M)."""

from __future__ import annotations

import torch

from sparsekit.formats import Pattern, parse_sparsity, pattern_mask

from .method import InputStat, LayerResult, PruningMethod, register_method


def magnitude_prune(
    weight: torch.Tensor, sparsity: str | float | Pattern
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (pruned [N, K] same dtype, mask [N, K] bool, True = kept).

    Unstructured compares all weights of the layer (the papers' magnitude baseline); N:M
    compares within each group of M input columns.
    """
    pattern = parse_sparsity(sparsity)
    _check_weight(weight)
    mask = pattern_mask(weight.detach().float().abs(), pattern, group="matrix")
    return weight * mask, mask


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")


@register_method
class Magnitude(PruningMethod):
    """|W|, compared across the whole layer (unstructured) or within each N:M group; no data."""

    name = "magnitude"

    def prune(self, weight: torch.Tensor, stat: InputStat | None, config) -> LayerResult:
        pruned, mask = magnitude_prune(weight, config.sparsity)
        return LayerResult(pruned, mask)

    def channel_scores(self, weight: torch.Tensor, stat: InputStat | None) -> torch.Tensor:
        return weight.detach().abs().float()
