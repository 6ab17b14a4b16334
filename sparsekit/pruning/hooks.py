"""Forward hooks the engine puts on a block's linear layers: statistics and output error."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sparsekit.models import linear_weight

from .capture import ForwardDone, outside_autocast
from .method import InputStat, Statistic


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


def fold_partial(stat: InputStat, layer: str) -> None:
    """Add a chunk's fp32 partial ``stat.value`` to its float64 ``total`` and zero it; a NaN / inf
    activation entering ``layer`` makes the sums non-finite (one reduction of the small statistic
    per chunk instead of a pass over every activation tensor) and is refused."""
    if not bool(torch.isfinite(stat.value.sum())):
        raise ValueError(
            f"NaN/inf activations entering {layer}: the model overflows on the calibration data; load it in "
            "float32 or check the input ids"
        )
    if stat.total is None:
        stat.total = torch.zeros_like(stat.value, dtype=torch.float64)
    stat.total += stat.value
    stat.value.zero_()


class StatsCollector:
    """Forward hooks accumulating a method's ``Statistic`` per distinct input tensor.

    Layers fed the same tensor object in a forward (q/k/v; gate/up) share one statistic; the
    tensors seen in the current chunk are held so identity checks stay valid.
    """

    def __init__(
        self, linears: dict[str, nn.Module], statistic: Statistic, timer: Timer, share: bool = True
    ) -> None:
        self.statistic = statistic
        self.share = share
        self.timer = timer
        self.owner: dict[str, InputStat] = {}
        self._seen: list[tuple[torch.Tensor, InputStat]] = []
        self._partial: dict[int, InputStat] = {}  # stats holding an fp32 partial of this chunk
        self._names: dict[int, str] = {}  # the first layer that fed each statistic (for errors)
        self._linears = linears
        self._hooks = {name: outside_autocast(self._hook(name)) for name in linears}
        self._handles = [m.register_forward_hook(self._hooks[name]) for name, m in linears.items()]
        self._calls: list[str] = []  # the layers whose hook ran in the current chunk, in order
        self.first_calls: list[str] | None = None  # the same for the first chunk

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor | None) -> None:
            self._calls.append(name)
            x = inputs[0]
            for seen, stat in self._seen if self.share else ():
                if seen is inputs[0]:
                    self.owner.setdefault(name, stat)
                    return
            with self.timer.phase("statistics"):
                stat = self.owner.get(name)
                if stat is None:
                    stat = self.owner[name] = self._new_stat(x)
                x = x.detach()
                self.statistic.accumulate(x, stat.value)
                stat.tokens += x.numel() // x.shape[-1]
                self._partial[id(stat)] = stat
                self._names.setdefault(id(stat), name)
            self._seen.append((inputs[0], stat))  # the tensor object itself: x.detach() is a new one

        return hook

    def stop_after_last(self) -> torch.utils.hooks.RemovableHandle | None:
        """From the next chunk on, end each forward (``ForwardDone``) at the layer that ran last in
        the first chunk, its statistic taken from its input first: nothing after it feeds a
        statistic, so the rest of the block (that layer's own GEMM included) is skipped.

        Only where the first chunk ran every hooked layer exactly once (a block whose layers do not
        depend on the data; not a Mixture of Experts). A chunk stops only once every other layer's
        hook has run in it; otherwise its forward runs on. Returns the pre-hook's handle, or None
        where no stop applies."""
        calls = self.first_calls or []
        if len(calls) != len(self._linears) or set(calls) != set(self._linears):
            return None
        last = calls[-1]
        others = set(calls[:-1])
        collect = self._hooks[last]

        def stop(module: nn.Module, inputs: tuple) -> None:
            if others.issubset(self._calls):
                collect(module, inputs, None)
                raise ForwardDone
            return None

        return self._linears[last].register_forward_pre_hook(stop)

    def _new_stat(self, x: torch.Tensor) -> InputStat:
        return InputStat(self.statistic.new(x.shape[-1], x.device))

    def ensure(self, linears: dict[str, nn.Module], device: torch.device) -> None:
        """A zero statistic (0 tokens) for every layer that saw no input (an expert the router never
        chose here), so every rank holds the same statistics when they are summed."""
        for name, module in linears.items():
            if name not in self.owner:
                stat = self.owner[name] = InputStat(self.statistic.new(module.in_features, device))
                stat.total = torch.zeros_like(stat.value, dtype=torch.float64)

    def next_chunk(self) -> None:
        """After each calibration chunk: add its fp32 partials to the float64 totals."""
        with self.timer.phase("statistics"):
            for key, stat in self._partial.items():
                fold_partial(stat, self._names[key])
        self._partial.clear()
        self._seen.clear()
        if self.first_calls is None:
            self.first_calls = list(self._calls)
        self._calls.clear()

    def finish(self, world=None) -> dict[str, InputStat]:
        """The statistics summed over every chunk (and over every rank of ``world`` when it is
        active), as fp32 ``value``s; returns them by layer name."""
        self.next_chunk()
        unique = list({id(s): s for _, s in sorted(self.owner.items())}.values())
        if world is not None and world.active:
            from .distributed import all_reduce_sum_

            with self.timer.phase("communication"):
                totals = [s.total for s in unique]
                tokens = torch.tensor(
                    [s.tokens for s in unique], dtype=torch.float64, device=totals[0].device
                )
                all_reduce_sum_([*totals, tokens])
            for stat, count in zip(unique, tokens.tolist(), strict=True):
                stat.tokens = int(count)
        for stat in unique:
            stat.value = stat.total.to(torch.float32)
            stat.total = None
        return self.owner

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def rel_error_parts(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> tuple[float, float]:
    """(sum ||dense - pruned||^2, sum ||dense||^2) over the chunks."""
    num = sum((d.float() - p.float()).square().sum().item() for d, p in zip(dense, pruned, strict=True))
    den = sum(d.float().square().sum().item() for d in dense)
    return num, den


class OutputErrorProbe:
    """Hooks comparing each pruned linear's output with the dense weight's on the same input.

    One extra GEMM per layer: diff = x (W - W')^T, and the dense output is output + diff. Only the
    first ``max_rows`` tokens of the first forward per layer are measured (an estimate: the
    probe must not cost a noticeable part of the block's own forward).
    """

    def __init__(
        self, linears: dict[str, nn.Module], dense: dict[str, torch.Tensor], max_rows: int = 1024
    ) -> None:
        self.num = dict.fromkeys(linears, 0.0)
        self.den = dict.fromkeys(linears, 0.0)
        self.calls = dict.fromkeys(linears, 0)
        self.max_calls = 1
        self.max_rows = max_rows
        self._handles = [
            m.register_forward_hook(outside_autocast(self._hook(n, m, dense[n]))) for n, m in linears.items()
        ]

    def _hook(self, name: str, module: nn.Module, dense_weight: torch.Tensor) -> Callable:
        delta = (dense_weight.float() - linear_weight(module).detach().float()).T.contiguous()

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self.calls[name] >= self.max_calls:
                return
            self.calls[name] += 1
            x, out = inputs[0].detach(), output.detach()
            if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != delta.shape[1]:
                return  # not a plain [..., out_features] output: nothing to compare
            diff = x.reshape(-1, x.shape[-1])[: self.max_rows].float() @ delta
            out = out.reshape(-1, out.shape[-1])[: self.max_rows].float()
            self.num[name] += diff.square().sum().item()
            self.den[name] += (out + diff).square().sum().item()

        return hook

    def errors(self) -> dict[str, float | None]:
        return {n: (self.num[n] / self.den[n] if self.den[n] > 0 else None) for n in self.num}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
