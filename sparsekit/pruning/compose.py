"""The two steps that run after a method's score has chosen a mask, each a small value chosen by
name in ``PruneConfig``:

- refine (``MaskRefine``): change the mask without training. ``NoRefine`` or ``DSnoT``.
- update (``WeightUpdate``): set the kept weights. ``NoUpdate`` (keep what the method gave),
  ``SparseGPTUpdate`` (SparseGPT's blocked OBS solve on the fixed mask) or ``ADMMUpdate``
  (Boža's ADMM least squares, warm-started from the weights it is given).

Per layer the engine runs: method.prune -> refine -> update. Each declares the calibration
statistics it reads; the engine collects the union of what the method and both steps need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsekit.formats import NMPattern, Pattern
from sparsekit.kernels.admm import ADMM_DAMP, ADMM_ITERS, ADMM_RHO, admm_update
from sparsekit.kernels.dsnot import DSNOT_CYCLES, DSNOT_THRESHOLD, DSNOT_VAR_POWER, dsnot_refine

from .method import Gram, InputStat, InputSum, SquaredNorm, Statistic
from .sparsegpt import sparsegpt_solve


# ----------------------------------------------------------------------------- refine
class MaskRefine:
    """Base class: ``refine`` returns a new mask with the same kept count per row / N:M group."""

    name: ClassVar[str]
    statistics: ClassVar[tuple[Statistic, ...]] = ()

    def refine(
        self,
        weight0: torch.Tensor,
        pruned: torch.Tensor,
        mask: torch.Tensor,
        stats: dict[str, InputStat],
        pattern: Pattern,
    ) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class NoRefine(MaskRefine):
    name: ClassVar[str] = "none"

    def refine(self, weight0, pruned, mask, stats, pattern):
        return mask


@dataclass(frozen=True)
class DSnoT(MaskRefine):
    """Prune-and-grow swaps that drive each row's expected output error sum_k dW_ik E[x_k] to zero
    (``sparsekit.kernels.dsnot``). ``threshold`` is on the per-token error: the paper's 0.1 was on
    sums over a 2048-token sequence, hence 0.1 / 2048."""

    max_cycles: int = DSNOT_CYCLES
    threshold: float = DSNOT_THRESHOLD
    var_power: float = DSNOT_VAR_POWER
    name: ClassVar[str] = "dsnot"
    statistics: ClassVar[tuple[Statistic, ...]] = (InputSum(), SquaredNorm())

    def refine(self, weight0, pruned, mask, stats, pattern):
        tokens = max(stats["sum"].tokens, 1)
        mean = stats["sum"].value / tokens
        sq = stats["sq_sum"].value
        var = (sq / tokens - mean.square()).clamp_min(0)
        n, m = (pattern.keep, pattern.group) if isinstance(pattern, NMPattern) else (None, None)
        return dsnot_refine(
            weight0, pruned, mask, mean, var, sq.sqrt(), n, m, self.max_cycles, self.threshold, self.var_power
        )


# ----------------------------------------------------------------------------- update
class WeightUpdate:
    """Base class: ``update`` returns the layer's weights [N, K] (zero off ``mask``)."""

    name: ClassVar[str]
    statistics: ClassVar[tuple[Statistic, ...]] = ()

    def update(
        self,
        weight0: torch.Tensor,
        pruned: torch.Tensor,
        mask: torch.Tensor,
        stats: dict[str, InputStat],
        config,
    ) -> torch.Tensor:
        raise NotImplementedError

    def solve_cost(self, rows: int, cols: int) -> float | None:
        """Relative cost of updating one [rows, cols] layer, as ``PruningMethod.solve_cost``."""
        return None


@dataclass(frozen=True)
class NoUpdate(WeightUpdate):
    name: ClassVar[str] = "none"

    def update(self, weight0, pruned, mask, stats, config):
        return pruned


@dataclass(frozen=True)
class SparseGPTUpdate(WeightUpdate):
    """SparseGPT's OBS solve with the mask held fixed (``config.blocksize``, ``config.percdamp``)."""

    name: ClassVar[str] = "sparsegpt"
    statistics: ClassVar[tuple[Statistic, ...]] = (Gram(),)

    def update(self, weight0, pruned, mask, stats, config):
        gram = stats["gram"]
        hessian = gram.value * (2.0 / max(gram.tokens, 1))
        return sparsegpt_solve(
            weight0, hessian, config.sparsity, config.blocksize, config.percdamp, keep=mask
        ).weight

    def solve_cost(self, rows: int, cols: int) -> float:
        return float(rows) * cols * cols


@dataclass(frozen=True)
class ADMMUpdate(WeightUpdate):
    """ADMM least squares on the mask, from the weights it is given (``sparsekit.kernels.admm``)."""

    iters: int = ADMM_ITERS
    rho: float = ADMM_RHO
    percdamp: float = ADMM_DAMP
    name: ClassVar[str] = "admm"
    statistics: ClassVar[tuple[Statistic, ...]] = (Gram(),)

    def __post_init__(self) -> None:
        if self.iters < 1 or not self.rho > 0 or not self.percdamp >= 0:
            raise ValueError(
                f"ADMM needs iters >= 1, rho > 0, percdamp >= 0; got {self.iters}, {self.rho}, "
                f"{self.percdamp}"
            )

    def solve_cost(self, rows: int, cols: int) -> float:
        return 2.0 * self.iters * rows * cols * cols + cols**3  # two GEMMs per iteration, one inverse

    def update(self, weight0, pruned, mask, stats, config):
        weight = admm_update(weight0, stats["gram"].value, mask, pruned, self.iters, self.rho, self.percdamp)
        return weight.to(weight0.dtype)


_REFINES = {"none": NoRefine, "dsnot": DSnoT}
_UPDATES = {"none": NoUpdate, "sparsegpt": SparseGPTUpdate, "admm": ADMMUpdate}


def mask_refine(spec: str | MaskRefine | None) -> MaskRefine:
    """``"none"`` | ``"dsnot"`` (paper defaults) | a ``MaskRefine`` value."""
    if isinstance(spec, MaskRefine):
        return spec
    try:
        return _REFINES[spec or "none"]()
    except KeyError:
        raise ValueError(f"unknown refine {spec!r}; choose one of {', '.join(_REFINES)}") from None


def weight_update(spec: str | WeightUpdate | None) -> WeightUpdate:
    """``"none"`` | ``"sparsegpt"`` | ``"admm"`` (paper defaults) | a ``WeightUpdate`` value."""
    if isinstance(spec, WeightUpdate):
        return spec
    try:
        return _UPDATES[spec or "none"]()
    except KeyError:
        raise ValueError(f"unknown update {spec!r}; choose one of {', '.join(_UPDATES)}") from None
