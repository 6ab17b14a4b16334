"""Timers: medians with 20th/80th percentiles.

CPU: wall clock around each call, median of repeats (adaptive: at least ``min_repeats`` and
enough calls to fill ``min_time_s``); ``Rotation`` makes each call read its weight from DRAM, as
a decode step does. GPU: ``triton.testing.do_bench`` (warmup, an L2 flush
before each call, CUDA events), or ``do_bench_cudagraph`` for small-M cases where launch
overhead would otherwise dominate.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    method: str  # "cpu-wall", "do_bench", "do_bench_cudagraph", "cuda-events"

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``samples_ms`` (linear interpolation between order statistics)."""
    if not samples_ms:
        raise ValueError("no samples to summarize")
    if len(samples_ms) == 1:
        return samples_ms[0], samples_ms[0], samples_ms[0]
    cuts = statistics.quantiles(samples_ms, n=10, method="inclusive")  # deciles: cuts[1] = p20
    return statistics.median(samples_ms), cuts[1], cuts[7]


class Rotation:
    """Call ``fns`` in turn, one per call: each a copy of the same layer on its own weight.

    How a decode step reads a layer's weight: from DRAM, because every other layer was streamed
    since its last use. With copies adding up to more than the last-level cache, the copy called
    next was evicted by the others (clean lines, as in a model), so each call pays the weight's
    DRAM read. A cache flush before each call gets this wrong: it leaves the cache full of dirty
    lines whose write-back the timed call then pays, and it evicts the input and the code too.
    """

    def __init__(self, fns: list[Callable[[], object]]) -> None:
        if not fns:
            raise ValueError("Rotation needs at least one function")
        self.fns, self.i = fns, 0

    def __call__(self) -> object:
        fn = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return fn()

    def warm(self) -> None:
        """One pass over every copy (first-touch page faults, lazily built kernels), untimed."""
        for fn in self.fns:
            fn()


def copies_for(weight_bytes: int, pool_bytes: int, max_copies: int = 4096) -> int:
    """How many copies of a ``weight_bytes`` weight add up to ``pool_bytes`` (at least 2)."""
    return max(2, min(max_copies, math.ceil(pool_bytes / max(weight_bytes, 1))))


def time_cpu(
    fn: Callable[[], object],
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 200,
    min_time_s: float = 0.2,
) -> Timing:
    """Median of repeated calls of ``fn`` on the CPU, after ``warmup`` untimed calls."""
    return time_cpu_interleaved({"fn": fn}, warmup, min_repeats, max_repeats, min_time_s)["fn"]


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int = 1,
    min_repeats: int = 5,
    max_repeats: int = 100,
    min_time_s: float = 0.2,
) -> dict[str, Timing]:
    """Time several functions round-robin: one call of each per round, medians per function.

    On a machine shared with other jobs, contention comes in bursts of seconds; interleaving makes
    every function see the same bursts, so their ratio (the speedup) stays meaningful even when
    absolute times move. Each round calls the functions in a new order (a seeded shuffle): the
    call that follows the timer's own loop, or a given neighbour, runs a few percent slower, and a
    fixed order would hand that to one function every round. Rounds continue until
    ``min_repeats`` and ``min_time_s`` (per function) are both met, or ``max_repeats``; calls
    slower than 0.1 s stop after 3 rounds.
    """
    slowest = 0.0
    for fn in fns.values():
        for _ in range(warmup):
            start = time.perf_counter()
            fn()
            slowest = max(slowest, time.perf_counter() - start)
    if slowest > 0.1:
        min_repeats = min(min_repeats, 3)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    rounds = 0
    order = list(fns.items())
    shuffle = random.Random(0).shuffle
    while rounds < max_repeats and (rounds < min_repeats or min(spent.values()) < min_time_s):
        shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            samples[name].append(elapsed * 1e3)
            spent[name] += elapsed
        rounds += 1
        if rounds >= 3 and max(spent.values()) / rounds > 0.1:
            break
    method = "cpu-wall, interleaved (shuffled rounds)"
    return {name: Timing(*quantiles(s), len(s), method) for name, s in samples.items()}


def time_gpu(
    fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100, cuda_graph: bool = False
) -> Timing:
    """``triton.testing.do_bench``: warmup, L2 flush before every call, CUDA events; median, p20, p80.

    ``cuda_graph=True`` captures ``fn`` in a CUDA graph (``do_bench_cudagraph``) so that launch
    overhead does not hide the kernel time at small M.
    """
    import triton.testing

    q = [0.5, 0.2, 0.8]
    if cuda_graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            med, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=q)
        return Timing(med, p20, p80, 0, "do_bench_cudagraph")
    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=q)
    return Timing(med, p20, p80, 0, "do_bench")


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    cuda_graph: bool = False,
    min_time_s: float = 0.2,
    max_repeats: int = 200,
) -> Timing:
    """Time ``fn`` with the right timer for ``device``."""
    if torch.device(device).type == "cuda":
        return time_gpu(fn, cuda_graph=cuda_graph)
    return time_cpu(fn, min_time_s=min_time_s, max_repeats=max_repeats)


class RegionTimer:
    """Wall time of one region with device synchronization on both sides (for end-to-end loops).

    On CUDA it records events, so queued host work does not count; ``elapsed_ms`` syncs.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def __enter__(self) -> RegionTimer:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.elapsed_ms = self._start.elapsed_time(self._end)
        else:
            self.elapsed_ms = (time.perf_counter() - self._t0) * 1e3


def choose_threads(requested: int | None = None) -> tuple[int, str | None]:
    """Set torch's CPU threads: ``requested``, or 1 when the machine is oversubscribed.

    With more runnable jobs than cores (1-minute load average >= cores), every multi-threaded
    op waits for a descheduled OpenMP worker, often a whole scheduler tick (measured here: a
    48x64x64 linear took 24 ms on 2 threads and 6 us on 1). Returns (threads, note for the report).
    """
    if requested:
        torch.set_num_threads(requested)
        return requested, None
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= cores and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        return 1, (
            f"load average {load:.1f} on {cores} cores: ran on 1 torch thread (multi-threaded ops stall "
            "on descheduled OpenMP workers when the machine is oversubscribed); pass --threads to override"
        )
    return torch.get_num_threads(), None
