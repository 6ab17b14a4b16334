"""What a pruning method is: an object that owns its calibration statistic and its prune call.

The engine runs decoder blocks, collects the statistic each method asks for (one per distinct
input tensor of the block's linears) and hands it to ``method.prune``. A new method is one file:
a ``PruningMethod`` subclass decorated with ``@register_method``, imported from
``sparsekit/pruning/__init__.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from sparsekit.formats import Pattern
from sparsekit.kernels import accumulate_gram, accumulate_sq_sum


class SolveSettings(Protocol):
    """What a method's solve reads of the run's configuration (``engine.PruneConfig`` is one);
    methods depend on this, not on the engine, so the engine imports methods and never the reverse."""

    sparsity: Pattern
    blocksize: int
    percdamp: float


_METHODS: dict[str, type[PruningMethod]] = {}


# ----------------------------------------------------------------------------- statistics
class Statistic:
    """A running fp32 statistic of one linear layer's input x [..., K] over calibration tokens."""

    name: ClassVar[str]

    def shape(self, in_features: int) -> tuple[int, ...]:
        raise NotImplementedError

    def new(self, in_features: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.shape(in_features), dtype=torch.float32, device=device)

    def accumulate(self, x: torch.Tensor, value: torch.Tensor) -> None:
        raise NotImplementedError


class SquaredNorm(Statistic):
    """sum over tokens of x_k^2, [K]: Wanda's ||X_k||_2 is its square root."""

    name = "sq_sum"

    def shape(self, in_features: int) -> tuple[int, ...]:
        return (in_features,)

    def accumulate(self, x: torch.Tensor, value: torch.Tensor) -> None:
        accumulate_sq_sum(x, value)


class Gram(Statistic):
    """X^T X over tokens, [K, K]: SparseGPT's Hessian is 2/n times it."""

    name = "gram"

    def shape(self, in_features: int) -> tuple[int, ...]:
        return (in_features, in_features)

    def accumulate(self, x: torch.Tensor, value: torch.Tensor) -> None:
        accumulate_gram(x, value)


class InputSum(Statistic):
    """sum over tokens of x_k, [K]: with the token count, the mean input DSnoT needs."""

    name = "sum"

    def shape(self, in_features: int) -> tuple[int, ...]:
        return (in_features,)

    def accumulate(self, x: torch.Tensor, value: torch.Tensor) -> None:
        value.add_(x.reshape(-1, x.shape[-1]).float().sum(dim=0))


class Bundle(Statistic):
    """Several statistics of one input in one flat fp32 buffer, so collecting, chunk sums and the
    distributed all-reduce handle them as one tensor; ``split`` gives each back by name."""

    def __init__(self, parts: tuple[Statistic, ...]) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def shape(self, in_features: int) -> tuple[int, ...]:
        return (sum(math.prod(p.shape(in_features)) for p in self.parts),)

    def _views(self, value: torch.Tensor, in_features: int) -> dict[str, torch.Tensor]:
        views, start = {}, 0
        for part in self.parts:
            shape = part.shape(in_features)
            size = math.prod(shape)
            views[part.name] = value[start : start + size].view(shape)
            start += size
        return views

    def accumulate(self, x: torch.Tensor, value: torch.Tensor) -> None:
        views = self._views(value, x.shape[-1])
        for part in self.parts:
            part.accumulate(x, views[part.name])

    def split(self, stat: InputStat, in_features: int) -> dict[str, InputStat]:
        views = self._views(stat.value, in_features)
        return {name: InputStat(view, stat.tokens) for name, view in views.items()}


def statistic_for(parts: list[Statistic]) -> Statistic | None:
    """One statistic collecting every distinct one of ``parts`` (by name): None, itself, or a Bundle."""
    unique = list({p.name: p for p in parts}.values())
    if not unique:
        return None
    return unique[0] if len(unique) == 1 else Bundle(tuple(unique))


def split_stat(statistic: Statistic | None, stat: InputStat | None, in_features: int) -> dict[str, InputStat]:
    """A collected stat of a [.., in_features] input as {statistic name: InputStat}."""
    if statistic is None or stat is None:
        return {}
    if isinstance(statistic, Bundle):
        return statistic.split(stat, in_features)
    return {statistic.name: stat}


@dataclass
class InputStat:
    """A statistic of one input tensor, shared by every linear layer that reads it.

    While the calibration forwards run, ``value`` holds the current chunk's fp32 partial and
    ``total`` the float64 sum of the finished chunks (``StatsCollector.next_chunk``); after
    ``StatsCollector.finish`` ``value`` is the fp32 total the methods read. Summing per-chunk
    partials in float64 makes the result independent of how the chunks are split over ranks.
    """

    value: torch.Tensor
    tokens: int = 0
    total: torch.Tensor | None = None


# ----------------------------------------------------------------------------- methods
@dataclass
class LayerResult:
    """What pruning one layer produced: the pruned weight [N, K], its mask (bool, True = kept)
    and, for solvers that damp, the dampening actually used."""

    weight: torch.Tensor
    mask: torch.Tensor
    percdamp: float | None = None


class PruningMethod:
    """Base class; subclasses set ``name`` and ``statistic`` and implement ``prune``."""

    name: ClassVar[str]
    statistic: ClassVar[Statistic | None] = None  # None: needs no calibration data
    # whether the method sets the kept weights from its statistic (a least-squares solve), not only
    # the mask: such methods prune in one calibration forward per block by default (``sequential``)
    updates_weights: ClassVar[bool] = False

    def prune(self, weight: torch.Tensor, stat: InputStat | None, config: SolveSettings) -> LayerResult:
        """weight [N, K] (any float dtype) with its input statistic -> the pruned layer."""
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None

    def channel_scores(self, weight: torch.Tensor, stat: InputStat | None) -> torch.Tensor:
        """weight [N, K] -> importance [N, K] fp32 by which an N:M channel permutation groups input
        channels (``PruneConfig(permute=True)``); the method's own score where it has one."""
        raise ValueError(f"{self.name} has no per-weight score to choose a channel permutation with")

    def solve_cost(self, rows: int, cols: int) -> float | None:
        """The relative cost of pruning one [rows, cols] layer, by which a distributed run spreads a
        block's layers over ranks (and broadcasts each result); None: cheaper than broadcasting the
        result, so every rank prunes every layer itself (the same inputs give the same weights)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available under ``cls.name`` (``PruneConfig(method=name)``)."""
    if cls.name in _METHODS:
        raise ValueError(f"pruning method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def pruning_method(method: str | PruningMethod) -> PruningMethod:
    """The method object for a name ('magnitude', 'wanda', 'sparsegpt', ...) or ``method`` itself."""
    if isinstance(method, PruningMethod):
        return method
    try:
        return _METHODS[method]()
    except KeyError:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(_METHODS)}") from None
