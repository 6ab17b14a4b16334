"""RIA (Zhang et al., 2024): relative importance and activations.

score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ a, a = 0.5 (the
paper's default): a weight matters relative to its row and to its column, not only in absolute
size. Compared within each output row (unstructured) or each N:M group, as Wanda does.
"""

from __future__ import annotations

import torch

from sparsekit.formats import Pattern, parse_sparsity, pattern_mask

from .magnitude import _check_weight
from .method import InputStat, LayerResult, PruningMethod, SquaredNorm, register_method

RIA_POWER = 0.5


def ria_scores(weight: torch.Tensor, act_norm: torch.Tensor, power: float = RIA_POWER) -> torch.Tensor:
    """weight [N, K], act_norm [K] -> scores [N, K] fp32."""
    w = weight.detach().abs().float()
    rows = w.sum(dim=1, keepdim=True).clamp_min(1e-30)
    cols = w.sum(dim=0, keepdim=True).clamp_min(1e-30)
    return (w / rows + w / cols) * act_norm.float().reshape(1, -1).pow(power)


def ria_prune(
    weight: torch.Tensor, act_norm: torch.Tensor, sparsity: str | float | Pattern, power: float = RIA_POWER
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K], act_norm [K] -> (pruned [N, K], mask [N, K] bool, True = kept); keep counts as Wanda."""
    _check_weight(weight)
    mask = pattern_mask(ria_scores(weight, act_norm, power), parse_sparsity(sparsity))
    return weight * mask, mask


@register_method
class RIA(PruningMethod):
    """(|W| / row sum + |W| / column sum) * ||X||_2 ^ 0.5, compared within each output row or N:M group."""

    name = "ria"
    statistic = SquaredNorm()

    def prune(self, weight: torch.Tensor, stat: InputStat | None, config) -> LayerResult:
        pruned, mask = ria_prune(weight, stat.value.sqrt(), config.sparsity)
        return LayerResult(pruned, mask)

    def channel_scores(self, weight: torch.Tensor, stat: InputStat | None) -> torch.Tensor:
        return ria_scores(weight, stat.value.sqrt())
