"""Sparsity patterns: an unstructured ratio or N:M along the input dimension."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Unstructured:
    """Prune ``sparsity`` of each comparison group (a row for Wanda, a layer for magnitude)."""

    sparsity: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"unstructured sparsity must be in [0, 1), got {self.sparsity}")

    def __str__(self) -> str:
        return f"{self.sparsity:g}"

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity


@dataclass(frozen=True)
class NMPattern:
    """Keep ``keep`` of every ``group`` consecutive input columns (2:4 keeps 2 of 4)."""

    keep: int
    group: int

    def __post_init__(self) -> None:
        if not (0 < self.keep < self.group):
            raise ValueError(
                f"N:M sparsity needs 0 < N < M (N kept of every M), got {self.keep}:{self.group}; "
                "for example 2:4 or 4:8"
            )

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.group

    @property
    def density(self) -> float:
        return self.keep / self.group

    def check_columns(self, in_features: int, name: str = "layer") -> None:
        if in_features % self.group:
            raise ValueError(
                f"{self} sparsity needs in_features % {self.group} == 0, but {name} has "
                f"in_features={in_features}; pick an M that divides it or use unstructured sparsity"
            )


Pattern = Unstructured | NMPattern
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_sparsity(spec: str | float | Pattern) -> Pattern:
    """'0.5' / 0.5 / '50%' -> Unstructured(0.5); '2:4' -> NMPattern(keep=2, group=4)."""
    if isinstance(spec, Unstructured | NMPattern):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"sparsity must be a ratio like 0.5 or a pattern like '2:4', got {spec!r}")
    if isinstance(spec, int | float):
        return Unstructured(float(spec))
    if not isinstance(spec, str):
        raise ValueError(f"sparsity must be a ratio like 0.5 or a pattern like '2:4', got {spec!r}")
    match = _NM.match(spec)
    if match:
        return NMPattern(int(match.group(1)), int(match.group(2)))
    text = spec.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(
            f"cannot parse sparsity {spec!r}: use a ratio in [0, 1) like 0.5, a percentage like 50%, "
            "or N:M like 2:4"
        ) from None
    return Unstructured(value)
