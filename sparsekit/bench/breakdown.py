"""Where a decode step's time goes, and whether the per-layer table adds up to it.

``decode_breakdown`` runs greedy decode steps with forward hooks on every linear and attention
module and splits each step into: the decoder linears (per weight shape and format), the
``lm_head``, attention (the attention modules' own work: rotary, KV-cache update, SDPA, minus
their linears) and the rest (embedding, norms, residual adds, the MLP activation, argmax, Python).
On the CPU the hooks read a wall clock (the CPU is synchronous, so the split is exact up to the
hooks' own cost, about a microsecond each); on CUDA each hook synchronizes, so there the split
attributes time but slows the step.

``LayersAlone`` runs the same linears the way the per-layer harness times them (modules on
random weights of the same shape and format, nothing else), one copy per layer of the model so
the weights stream from DRAM as often as in the model; its steps are interleaved with the
model's, so the two measurements can be compared on a machine whose speed drifts.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sparsekit.bench.e2e import _Generator
from sparsekit.bench.layers import SETUPS, LinearShape, make_case
from sparsekit.bench.timing import quantiles, synchronize
from sparsekit.kernels import use_backend
from sparsekit.models import model_device, model_dtype
from sparsekit.nn import SparseLinear

log = logging.getLogger(__name__)

CATEGORIES = ("linears", "lm_head", "attention", "rest")


@dataclass
class LinearGroup:
    """The linears of one weight shape and format: ``count`` of them per decode step."""

    n: int
    k: int
    format: str  # "dense" (nn.Linear) or the SparseLinear format
    count: int
    lm_head: bool
    ms_per_step: float = 0.0  # median over steps of their summed time

    @property
    def key(self) -> str:
        return f"{'lm_head' if self.lm_head else 'linear'} {self.n}x{self.k} {self.format}"


@dataclass
class Breakdown:
    step_ms: float  # median decode-step time with the hooks in place
    categories: dict[str, float]  # median ms per step of each of CATEGORIES
    groups: list[LinearGroup]
    steps: int
    batch: int
    hooks: int  # hooked modules (each costs about two clock reads per step)
    dtype: str = ""
    plain_step_ms: float = float("nan")  # median decode step without hooks, interleaved with the hooked runs
    plain_step_p20_ms: float = float("nan")
    plain_step_p80_ms: float = float("nan")
    layers_alone: dict[str, float] = field(default_factory=dict)  # group key -> ms per step, ``LayersAlone``
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks' attention modules (``self_attn`` / ``attn`` / ``attention``, outermost),
    found by name so a sparsified model (SparseLinear layers) is found as well as a dense one."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("self_attn", "attn", "attention"):
            if not any(name.startswith(outer + ".") for outer, _ in found):
                found.append((name, module))
    return [m for _, m in found]


def _format_of(module: nn.Module) -> str:
    return module.format if isinstance(module, SparseLinear) else "dense"


class _Hooks:
    """Forward pre/post hooks that add each module's wall time to its bucket while ``on``."""

    def __init__(self, model: nn.Module) -> None:
        self.device = model_device(model)
        self.on = False
        self.inside_attention = 0
        self.totals: dict[str, float] = defaultdict(float)
        self.handles = []
        self.groups: dict[str, LinearGroup] = {}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for module in model.modules():
            if isinstance(module, nn.Linear | SparseLinear):
                n, k = module.out_features, module.in_features
                group = LinearGroup(n, k, _format_of(module), 0, module is head)
                group = self.groups.setdefault(group.key, group)
                group.count += 1
                self._hook(module, group.key, linear=True)
        for attn in _attention_modules(model):
            self._hook(attn, "attention", linear=False)

    def _hook(self, module: nn.Module, bucket: str, linear: bool) -> None:
        starts: list[float] = []

        def pre(_module, _args):
            if self.on:
                synchronize(self.device)
                if not linear:
                    self.inside_attention += 1
                starts.append(time.perf_counter())

        def post(_module, _args, _out):
            if self.on and starts:
                synchronize(self.device)
                elapsed = (time.perf_counter() - starts.pop()) * 1e3
                self.totals[bucket] += elapsed
                if linear and self.inside_attention:
                    self.totals["attention linears"] += elapsed
                if not linear:
                    self.inside_attention -= 1

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Probe:
    """One model's generator whose decode steps record the hooks' split of each step."""

    def __init__(self, model: nn.Module, max_len: int, cache: str) -> None:
        self.model, self.device = model, model_device(model)
        self.gen = _Generator(model, max_len, False, cache)
        self.hooks: _Hooks | None = None
        self.per_step: dict[str, list[float]] = defaultdict(list)
        self.plain_steps: list[float] = []
        self.groups: list[LinearGroup] = []
        self.hooked_modules = 0
        self.decode = self.gen.decode_fn
        self.gen.decode_fn = self._timed_decode

    def attach(self) -> None:
        self.hooks = _Hooks(self.model)

    def detach(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks = None

    def _timed_decode(self, *args):
        hooks = self.hooks
        if hooks is None:  # no hooks: the plain step time (what TPOT measures)
            synchronize(self.device)
            start = time.perf_counter()
            out = self.decode(*args)
            synchronize(self.device)
            self.plain_steps.append((time.perf_counter() - start) * 1e3)
            return out
        hooks.totals.clear()
        hooks.on = True
        synchronize(self.device)
        start = time.perf_counter()
        out = self.decode(*args)
        synchronize(self.device)
        step = (time.perf_counter() - start) * 1e3
        hooks.on = False
        totals = dict(hooks.totals)
        linears = sum(v for k, v in totals.items() if k.startswith("linear "))
        head = sum(v for k, v in totals.items() if k.startswith("lm_head "))
        attention = totals.get("attention", 0.0) - totals.get("attention linears", 0.0)
        for key, value in (("step", step), ("linears", linears), ("lm_head", head), ("attention", attention)):
            self.per_step[key].append(value)
        self.per_step["rest"].append(step - linears - head - attention)
        for key in hooks.groups:
            self.per_step[key].append(totals.get(key, 0.0))
        self.groups = list(hooks.groups.values())
        self.hooked_modules = len(hooks.handles) // 2
        return out

    def result(self, batch: int) -> Breakdown:
        med = {k: statistics.median(v) for k, v in self.per_step.items()}
        for g in self.groups:
            g.ms_per_step = med[g.key]
        plain = quantiles(self.plain_steps) if self.plain_steps else (float("nan"),) * 3
        return Breakdown(
            step_ms=med["step"],
            categories={c: med[c] for c in CATEGORIES},
            groups=self.groups,
            steps=len(self.per_step["step"]),
            batch=batch,
            hooks=self.hooked_modules,
            dtype=str(model_dtype(self.model)).replace("torch.", ""),
            plain_step_ms=plain[0],
            plain_step_p20_ms=plain[1],
            plain_step_p80_ms=plain[2],
        )


@torch.no_grad()
def decode_breakdowns(
    models: dict[str, nn.Module],
    input_ids: torch.Tensor,
    new_tokens: int = 16,
    rounds: int = 3,
    cache: str = "static",
    layers_alone: bool = True,
) -> dict[str, Breakdown]:
    """Median per decode step of each category, per model, over ``rounds`` rounds. Each round runs,
    for every model in turn, one generation of ``new_tokens`` with the hooks, one without
    (``plain_step_ms``: the TPOT the hooks perturb) and, with ``layers_alone``, as many steps of
    its linears alone (``LayersAlone``: the per-layer prediction), so every measurement sees the
    same machine: a shared VM's speed drifts by tens of percent over minutes."""
    if new_tokens < 2:
        raise ValueError(f"a breakdown needs at least 2 new tokens (one decode step), got {new_tokens}")
    probes = {name: _Probe(m, input_ids.shape[1] + new_tokens, cache) for name, m in models.items()}
    alone: dict[str, LayersAlone] = {}
    for name, probe in probes.items():  # untimed warmup (lazily bound kernels, first-touch pages)
        probe.attach()
        probe.gen.run(input_ids.to(probe.device), new_tokens)
        groups = list(probe.hooks.groups.values())
        probe.detach()
        probe.per_step.clear()
        probe.plain_steps.clear()
        if layers_alone:
            alone[name] = LayersAlone(groups, input_ids.shape[0], model_dtype(probe.model), probe.device)
    try:
        for _ in range(rounds):
            for name, probe in probes.items():
                probe.attach()
                probe.gen.run(input_ids.to(probe.device), new_tokens)
                probe.detach()
                probe.gen.run(input_ids.to(probe.device), new_tokens)
                for _ in range(new_tokens - 1 if name in alone else 0):
                    alone[name].step()
    finally:
        for probe in probes.values():
            probe.detach()
    out = {name: probe.result(input_ids.shape[0]) for name, probe in probes.items()}
    for name, a in alone.items():
        out[name].layers_alone = a.medians()
    return out


def decode_breakdown(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int = 16,
    rounds: int = 3,
    cache: str = "static",
    layers_alone: bool = True,
) -> Breakdown:
    """``decode_breakdowns`` of one model."""
    return decode_breakdowns({"model": model}, input_ids, new_tokens, rounds, cache, layers_alone)["model"]


_BACKEND_OF_FORMAT = {"dense": "dense", "2:4": "2:4", "bitmap": "bitmap", "masked": "masked"}


class LayersAlone:
    """The per-layer harness's version of one decode step: for every group, ``count`` independent
    layers of its shape and format (fresh random weights of that pattern, called as modules with
    x [batch, 1, K], as ``run_layers`` does), each called once per step. Nothing else runs, so
    summing a group's calls is the per-layer table's prediction of that group's in-model time,
    with the weights streamed from DRAM exactly as often as in the model."""

    def __init__(self, groups: Sequence[LinearGroup], batch: int, dtype: torch.dtype, device) -> None:
        self.calls: dict[str, list] = {}
        for g in groups:
            pattern = "2:4" if g.format == "2:4" else "0.5"
            shape = LinearShape("model", g.key, g.n, g.k)
            case = make_case(shape, batch, pattern, dtype, torch.device(device))
            case.x = case.x.reshape(batch, 1, g.k)  # the decode step's [batch, 1 token, K]
            prepared = SETUPS[_BACKEND_OF_FORMAT[g.format]](case)
            self.calls[g.key] = [prepared.fn] + [prepared.replicate() for _ in range(g.count - 1)]
        self.device = torch.device(device)
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.step()  # untimed: first touch, lazily bound kernels
        self.samples.clear()

    def step(self) -> None:
        with use_backend("torch" if self.device.type == "cpu" else "auto"):
            for key, fns in self.calls.items():
                synchronize(self.device)
                start = time.perf_counter()
                for fn in fns:
                    fn()
                synchronize(self.device)
                self.samples[key].append((time.perf_counter() - start) * 1e3)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}


def consistency_rows(breakdown: Breakdown) -> list[dict]:
    """In model vs the layers alone, per group and in total, plus the hooks' cost (hooked step vs
    the hook-free TPOT of the same rounds)."""
    alone = breakdown.layers_alone
    rows = [
        {
            "what": g.key,
            "count": g.count,
            "in_model_ms": g.ms_per_step,
            "per_layer_ms": alone[g.key],
            "ratio": alone[g.key] / g.ms_per_step if g.ms_per_step else float("nan"),
        }
        for g in breakdown.groups
    ]
    in_model = breakdown.categories["linears"] + breakdown.categories["lm_head"]
    predicted = sum(alone.values())
    rows.append(
        {
            "what": "all linears + lm_head",
            "count": sum(g.count for g in breakdown.groups),
            "in_model_ms": in_model,
            "per_layer_ms": predicted,
            "ratio": predicted / in_model,
        }
    )
    rows.append(
        {
            "what": "decode step: hooked (in model) vs TPOT without hooks (per-layer column)",
            "count": None,
            "in_model_ms": breakdown.step_ms,
            "per_layer_ms": breakdown.plain_step_ms,
            "ratio": breakdown.plain_step_ms / breakdown.step_ms,
        }
    )
    return rows


def breakdown_markdown(named: Sequence[tuple[str, Breakdown]]) -> str:
    """One table of categories per variant, then in-model vs per-layer per group."""
    lines = [
        "| variant | decode step ms (hooked) | TPOT ms (no hooks) | linears | lm_head | attention | rest |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b in named:
        tpot = b.plain_step_ms
        cats = " | ".join(
            f"{b.categories[c]:.2f} ({100 * b.categories[c] / b.step_ms:.0f}%)" for c in CATEGORIES
        )
        lines.append(f"| {name} | {b.step_ms:.2f} | {'-' if tpot is None else f'{tpot:.2f}'} | {cats} |")
    lines += [
        "",
        "| variant | what | count | in model ms/step | per-layer sum ms/step | per-layer / in-model |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, b in named:
        for r in consistency_rows(b):
            count = "" if r["count"] is None else r["count"]
            lines.append(
                f"| {name} | {r['what']} | {count} | {r['in_model_ms']:.2f} | {r['per_layer_ms']:.2f} | "
                f"{r['ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"
