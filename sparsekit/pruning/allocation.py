"""How much of each decoder block to prune: uniform, or OWL (outlier-weighted layerwise sparsity).

OWL (Yin et al., 2024) observes that blocks whose Wanda scores |W| * ||X||_2 hold more
outliers (entries above ``m`` times their block's mean score) suffer more from pruning, and gives
them a lower sparsity: the blocks' outlier ratios are scaled linearly to a spread of
``2 * lam`` and centred on the target, so the mean block sparsity, and with equal-sized blocks
the overall sparsity, is the target exactly. The paper's defaults: m = 5, lam = 0.08.
An allocation is a value: ``Uniform()`` or ``OWL(lam, m)``, chosen by name in ``PruneConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch


class Allocation:
    """Base class: ``needs_scores`` says whether ``block_sparsities`` needs per-block outlier ratios."""

    name: ClassVar[str]
    needs_scores: ClassVar[bool] = False

    def block_sparsities(self, target: float, ratios: Sequence[float]) -> list[float]:
        raise NotImplementedError


@dataclass(frozen=True)
class Uniform(Allocation):
    name: ClassVar[str] = "uniform"

    def block_sparsities(self, target: float, ratios: Sequence[float]) -> list[float]:
        return [target] * len(ratios)


@dataclass(frozen=True)
class OWL(Allocation):
    """Outlier-weighted layerwise sparsity; ``lam``: half the spread, ``m``: the outlier threshold."""

    lam: float = 0.08
    m: float = 5.0
    name: ClassVar[str] = "owl"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.lam < 0.5:
            raise ValueError(f"OWL lambda must be in [0, 0.5), got {self.lam}")
        if not self.m > 0:
            raise ValueError(f"OWL M must be > 0, got {self.m}")

    def block_sparsities(self, target: float, ratios: Sequence[float]) -> list[float]:
        """Blocks with more outliers keep more: keep_l = 1 - target + 2 lam (r_l - r_min) / (r_max - r_min)
        - its mean offset, so that the mean sparsity is ``target``."""
        r = torch.tensor(list(ratios), dtype=torch.float64)
        spread = r.max() - r.min()
        scaled = (r - r.min()) / spread * 2 * self.lam if spread > 0 else torch.zeros_like(r)
        keep = scaled - scaled.mean() + (1 - target)
        sparsities = (1 - keep).tolist()
        if min(sparsities) < 0 or max(sparsities) >= 1:
            raise ValueError(
                f"OWL with lambda {self.lam} around sparsity {target} gives block sparsities outside [0, 1): "
                f"{min(sparsities):.3f}..{max(sparsities):.3f}; use a smaller --owl-lambda"
            )
        return sparsities


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of the entries of all ``scores`` (a block's linears' Wanda scores) above ``m`` times
    their common mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


_ALLOCATIONS = {"uniform": Uniform, "owl": OWL}


def allocation(spec: str | Allocation) -> Allocation:
    """``"uniform"`` | ``"owl"`` (paper defaults) | an ``Allocation`` value."""
    if isinstance(spec, Allocation):
        return spec
    try:
        return _ALLOCATIONS[spec]()
    except KeyError:
        raise ValueError(f"unknown allocation {spec!r}; choose one of {', '.join(_ALLOCATIONS)}") from None
