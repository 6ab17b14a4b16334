"""Wanda: score |W| * ||X||_2 per input channel, compare within each output row."""

from __future__ import annotations

import torch

from sparsekit.formats import NMPattern, Pattern, parse_sparsity
from sparsekit.kernels import unpack_mask, wanda_mask

from .magnitude import _check_weight
from .method import InputStat, LayerResult, PruningMethod, SquaredNorm, register_method


def wanda_prune(
    weight: torch.Tensor, act_norm: torch.Tensor, sparsity: str | float | Pattern
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K], act_norm [K] (l2 norm of each input channel over the calibration tokens)
    -> (pruned [N, K] same dtype, mask [N, K] bool, True = kept).

    Unstructured keeps ``K - floor(K * sparsity)`` per output row; N:M keeps the top N of every
    M consecutive input columns. Ties go to the lower column index.
    """
    pattern = parse_sparsity(sparsity)
    _check_weight(weight)
    if isinstance(pattern, NMPattern):
        pattern.check_columns(weight.shape[1])
        bits = wanda_mask(weight.detach(), act_norm, n=pattern.keep, m=pattern.group)
    else:
        bits = wanda_mask(weight.detach(), act_norm, sparsity=pattern.sparsity)
    mask = unpack_mask(bits, weight.shape)
    return weight * mask, mask


@register_method
class Wanda(PruningMethod):
    """|W| * ||X||_2 per input channel, compared within each output row (or each N:M group)."""

    name = "wanda"
    statistic = SquaredNorm()

    def prune(self, weight: torch.Tensor, stat: InputStat | None, config) -> LayerResult:
        pruned, mask = wanda_prune(weight, stat.value.sqrt(), config.sparsity)
        return LayerResult(pruned, mask)

    def channel_scores(self, weight: torch.Tensor, stat: InputStat | None) -> torch.Tensor:
        return weight.detach().abs().float() * stat.value.sqrt().reshape(1, -1)
