"""The CPU runtime rule of ``SparseLinear``: its sparse kernel or dense, whichever is faster here.

``cpu_rule='fastest'`` on a CPU layer: for each M class (rows of x, rounded up to a power of 2: 1,
2, 4, ..., 512, 1024+) from ``MIN_M`` up, the first forward in that class times, at the class's
largest rows, the layer's sparse kernel against dense ``F.linear`` on a decompressed copy of its
weight (interleaved repeats, medians) and remembers the winner for every layer of the same format,
ISA, dtype and shape in this process. Where dense wins (with ``MARGIN`` at -0.1: unless the sparse
kernel measured at least 9% faster), the layer keeps that dense copy and runs it for the class: the
memory cost is N * K * element bytes per such layer (``SparseLinear.dense_copy_bytes()``; logged
once per layer). At M = 1 (one sequence decoding) the sparse kernel always runs: every format
there streams fewer bytes than dense and wins (docs/data/cpu-isa-layers.md), and a decode step
pays no measurement. From ``MIN_M`` (2) up each side of the measurement rotates over copies of
its own weight adding up to twice the last-level cache (at most ``COLD_MAX_BYTES``; a small layer
gets as many copies as that takes), so both sides read their weights from DRAM as in a model's
forward. (``MIN_M`` was 16 while the measurement could be cache-warm on one side; on Llama-2-7B's
shapes bitmap bf16 at M = 4 then ran its sparse kernel at 0.87-0.94x dense: docs/results.md.)
``cpu_rule='sparse'`` (the default) never holds a dense copy: memory first. A decision table that
``sparsekit bench rule-table`` measured in the model's own forward replaces the first-call
measurements for the keys it holds (``cpu_rule_table.load_table``, ``SPARSEKIT_CPU_RULE_TABLE``).

The process default is ``SPARSEKIT_CPU_RULE`` (read once: 'sparse' unless set, or 'fastest' when
``SPARSEKIT_CPU_RULE_TABLE`` names a table), what a layer built
without ``cpu_rule=`` gets, ``from_pretrained`` and ``sparsekit.load`` included; ``apply(model,
rule)`` sets every SparseLinear of a model already built.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from sparsekit.kernels.cpu_ext import llc_bytes

log = logging.getLogger(__name__)

CPU_RULES = ("sparse", "fastest")
MIN_M = 2  # smallest M class the rule measures; below it (decode, M = 1) the sparse kernel runs
# dense is chosen when dense_ms < (1 - MARGIN) * sparse_ms. Negative: the sparse kernel keeps a
# layer only when it measured at least -MARGIN / (1 - MARGIN) faster (9% at -0.1); a closer call
# goes to the dense copy, which runs at dense speed by construction, because one short first-call
# measurement and a later one in another cache context part by up to about 10%. On EPYC-512, after
# each side was timed cold in its own bytes: 0 left 10 of 800 rule cells below 0.95x dense over 1
# and 2 threads, -0.1 left 4 (docs/results.md, "The rule measured cold on both sides")
MARGIN = -0.1
ROUNDS = 7
COLD_MAX_BYTES = 256 * 2**20  # each side's copies in a DRAM-cold measurement add up to at most this
COLD_MAX_COPIES = 4096  # and number at most this (a tiny layer's setup stays under a second)

# (format, isa, dtype, N, K, M class) -> True when dense won
_DECISIONS: dict[tuple, bool] = {}
# the same keys -> (sparse ms, dense ms): the medians a decision was measured on (none when pinned)
_MEASURED: dict[tuple, tuple[float, float]] = {}
# bumped by ``pin`` and ``forget``: a layer's memoised plan is valid while this is unchanged
DECISION_GENERATION: list[int] = [0]


def check_cpu_rule(rule: str) -> str:
    if rule not in CPU_RULES:
        raise ValueError(f"unknown cpu_rule {rule!r}; choose one of {', '.join(CPU_RULES)}")
    return rule


_DEFAULT: list[str] = []


def default_rule() -> str:
    """The rule of a layer built without ``cpu_rule=``: ``SPARSEKIT_CPU_RULE`` (read once), else
    'fastest' when ``SPARSEKIT_CPU_RULE_TABLE`` names a decision table, else 'sparse'."""
    if not _DEFAULT:
        table = os.environ.get("SPARSEKIT_CPU_RULE_TABLE")
        value = os.environ.get("SPARSEKIT_CPU_RULE", "fastest" if table else "sparse")
        try:
            _DEFAULT.append(check_cpu_rule(value))
        except ValueError as exc:
            raise ValueError(f"SPARSEKIT_CPU_RULE: {exc}") from None
        if table and value == "sparse":
            raise ValueError(
                "SPARSEKIT_CPU_RULE_TABLE names a decision table, but SPARSEKIT_CPU_RULE=sparse never "
                "reads one: unset SPARSEKIT_CPU_RULE (a table implies 'fastest') or the table"
            )
    return _DEFAULT[0]


_ENV_TABLES: list[bool] = []


def _load_env_tables() -> None:
    """Pin the decisions of the tables SPARSEKIT_CPU_RULE_TABLE names, once per process (a table
    that fails to load raises again on the next call: it is never silently skipped)."""
    if not _ENV_TABLES:
        from .cpu_rule_table import load_env_tables  # it imports this module

        load_env_tables()
        _ENV_TABLES.append(True)


def apply(model: torch.nn.Module, rule: str) -> int:
    """Set ``cpu_rule`` on every SparseLinear of ``model``; returns how many layers it set."""
    check_cpu_rule(rule)
    layers = [m for m in model.modules() if hasattr(m, "dense_copy_bytes") and hasattr(m, "cpu_rule")]
    for layer in layers:
        layer.cpu_rule = rule
    return len(layers)


def dense_copy_bytes(model: torch.nn.Module) -> int:
    """Bytes of the dense copies the rule's layers of ``model`` hold now (0 under 'sparse')."""
    return sum(m.dense_copy_bytes() for m in model.modules() if hasattr(m, "dense_copy_bytes"))


def m_class(rows: int) -> int:
    """Rows of x rounded up to a power of 2, capped at 1024 (prefill). Classes within 2x: a direct
    kernel's cost grows with M faster than dense's, a blas path's fixed decompression shrinks
    relative to it, so classes 4x wide, timed at either end, misjudged the other end
    (docs/results.md, "The rule on Xeon-AMX")."""
    bucket = 1
    while bucket < rows and bucket < 1024:
        bucket *= 2
    return bucket


def is_decided_class(m: int) -> bool:
    """Whether ``m`` is an M class the rule decides: a power of 2 from MIN_M to 1024."""
    return m >= MIN_M and m == m_class(m)


def _timed(fn: Callable[[], object], samples: list[float]) -> None:
    start = time.perf_counter()
    fn()
    samples.append((time.perf_counter() - start) * 1e3)


def _copies(per_copy: int) -> int:
    """Copies of ``per_copy`` bytes adding up to twice the last-level cache (capped)."""
    wanted = -(-min(2 * llc_bytes(), COLD_MAX_BYTES) // max(per_copy, 1))
    return max(1, min(wanted, COLD_MAX_COPIES))


def dense_wins(
    key: tuple,
    sparse: Callable[[torch.Tensor], torch.Tensor],
    dense_weight: torch.Tensor,
    rows: int,
    replicate: Callable[[], tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], torch.Tensor]]]
    | None = None,
    sparse_bytes: int | None = None,
) -> bool:
    """Whether dense ``F.linear`` beat ``sparse(x)`` by more than MARGIN on x [1, rows, K] (a batch-1
    model's input; measured once per ``key``, then remembered).

    ``replicate()`` -> (a sparse call on a fresh copy of the stored tensors, a function making a
    fresh dense weight): when given, each side rotates over its own copies adding up to twice the
    last-level cache, counted in its own bytes (``sparse_bytes``: the stored tensors' bytes, default
    the dense weight's), so every timed call of either side reads its weight from DRAM, as a layer
    in a model's forward does. Cache-warm timing favours dense, whose weight is larger; copies
    counted in dense bytes left a 4x smaller int8 weight cache-resident and favoured it."""
    if key in _DECISIONS:
        return _DECISIONS[key]
    x = torch.randn(1, rows, dense_weight.shape[1], dtype=dense_weight.dtype)
    sides: dict[str, list] = {"sparse": [sparse], "dense": [dense_weight]}
    if replicate is not None:
        dense_size = dense_weight.numel() * dense_weight.element_size()
        n_sparse, n_dense = _copies(sparse_bytes or dense_size), _copies(dense_size)
        while len(sides["sparse"]) < n_sparse or len(sides["dense"]) < n_dense:
            call, make_dense = replicate()
            if len(sides["sparse"]) < n_sparse:
                sides["sparse"].append(call)
            if len(sides["dense"]) < n_dense:
                sides["dense"].append(make_dense())
    turns = {"sparse": 0, "dense": 0}

    def rotating(side: str) -> Callable[[], object]:
        copies = sides[side]

        def call() -> object:
            turns[side] = (turns[side] + 1) % len(copies)
            fn = copies[turns[side]]
            return fn(x) if side == "sparse" else F.linear(x, fn)

        return call

    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    calls = {side: rotating(side) for side in sides}
    longest = max(len(c) for c in sides.values())
    with torch.no_grad():
        for side, fn in calls.items():
            for _ in range(len(sides[side])):
                fn()  # untimed: first-call setup (oneDNN primitives, page faults), every copy
        order = list(calls.items())
        for turn_ in range(ROUNDS * max(1, longest // 4)):
            for name, fn in order if turn_ % 2 else order[::-1]:  # alternate who goes first
                _timed(fn, times[name])
    sparse_ms, dense_ms = statistics.median(times["sparse"]), statistics.median(times["dense"])
    won = dense_ms < (1.0 - MARGIN) * sparse_ms
    _DECISIONS[key] = won
    _MEASURED[key] = (sparse_ms, dense_ms)
    winner = "dense" if won else "sparse"
    log.info(
        "cpu rule %s: sparse %.3f ms (%d copies), dense %.3f ms (%d copies) -> %s",
        key,
        sparse_ms,
        len(sides["sparse"]),
        dense_ms,
        len(sides["dense"]),
        winner,
    )
    return won


def decisions() -> dict[tuple, bool]:
    """What the rule measured so far in this process (a copy)."""
    return dict(_DECISIONS)


def measured(key: tuple) -> tuple[float, float] | None:
    """(sparse ms, dense ms) the decision for ``key`` was measured on (first call or a table); None
    when it was pinned without them or not made yet."""
    return _MEASURED.get(key)


def decided(key: tuple) -> bool | None:
    """The decision measured or pinned for ``key``, or None (no copy of the table). The first call
    in a process loads the tables SPARSEKIT_CPU_RULE_TABLE names."""
    if not _ENV_TABLES:
        _load_env_tables()
    return _DECISIONS.get(key)


def pin(key: tuple, dense_won: bool, measured_ms: tuple[float, float] | None = None) -> None:
    """Record a decision without measuring it (from a table a benchmark wrote, or to force a
    path): key = (format, isa, dtype str, N, K, M class); ``measured_ms`` = (sparse ms, dense ms)
    the table measured it on, for ``measured``."""
    if len(key) != 6 or key[-1] != m_class(key[-1]):
        raise ValueError(f"a decision key is (format, isa, dtype, N, K, M class), got {key!r}")
    _DECISIONS[key] = bool(dense_won)
    if measured_ms is None:
        _MEASURED.pop(key, None)
    else:
        _MEASURED[key] = (float(measured_ms[0]), float(measured_ms[1]))
    DECISION_GENERATION[0] += 1  # layers re-read their memo


def forget(keys: Iterable[tuple] | None = None) -> None:
    """Drop every measured or pinned decision, a loaded table's included, or only those of ``keys``
    (the next forward in each class measures again)."""
    if keys is None:
        _DECISIONS.clear()
        _MEASURED.clear()
    else:
        for key in keys:
            _DECISIONS.pop(key, None)
            _MEASURED.pop(key, None)
    DECISION_GENERATION[0] += 1


__all__ = [
    "CPU_RULES", "DECISION_GENERATION", "MARGIN", "MIN_M", "apply", "check_cpu_rule", "decided",
    "decisions", "default_rule", "dense_copy_bytes", "dense_wins", "forget", "is_decided_class", "m_class",
    "measured", "pin",
]  # fmt: skip
