"""Where a decode step's time goes, and whether the per-layer table adds up to it.

``decode_breakdown`` runs greedy decode steps with forward hooks on every linear and attention
module and splits each step into: the decoder linears (per weight shape and format), the
``lm_head``, attention (the attention modules' own work: rotary, KV-cache update, SDPA, minus
their linears) and the rest (embedding, norms, residual adds, the MLP activation, argmax, Python).
On the CPU the hooks read a wall clock (the CPU is synchronous, so the split is exact up to the
hooks' own cost, about a microsecond each); on CUDA each hook synchronizes, so there the split
attributes time but slows the step.

``per_layer_prediction`` times the same linears in isolation with ``run_layers`` (weights read
from DRAM, as in a model) and adds them up, so the two measurements can be compared.
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

from sparsekit.arch import find_decoder_blocks, model_device, model_dtype
from sparsekit.bench.e2e import _Generator
from sparsekit.bench.layers import LinearShape, run_layers
from sparsekit.bench.timing import synchronize
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
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    _, blocks = find_decoder_blocks(model)
    found = []
    for block in blocks:
        attn = next(
            (getattr(block, a) for a in ("self_attn", "attn", "attention") if hasattr(block, a)), None
        )
        if attn is not None:
            found.append(attn)
    return found


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


@torch.no_grad()
def decode_breakdown(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 16, rounds: int = 3, cache: str = "static"
) -> Breakdown:
    """Median per decode step of each category over ``rounds`` generations of ``new_tokens``."""
    if new_tokens < 2:
        raise ValueError(f"a breakdown needs at least 2 new tokens (one decode step), got {new_tokens}")
    device = model_device(model)
    input_ids = input_ids.to(device)
    gen = _Generator(model, input_ids.shape[1] + new_tokens, False, cache)
    gen.run(input_ids, new_tokens)  # untimed warmup (lazily bound kernels, first-touch pages)
    hooks = _Hooks(model)
    per_step: dict[str, list[float]] = defaultdict(list)
    decode = gen.decode_fn

    def timed_decode(*args):
        hooks.totals.clear()
        hooks.on = True
        synchronize(device)
        start = time.perf_counter()
        out = decode(*args)
        synchronize(device)
        step = (time.perf_counter() - start) * 1e3
        hooks.on = False
        totals = dict(hooks.totals)
        linears = sum(v for k, v in totals.items() if k.startswith("linear "))
        head = sum(v for k, v in totals.items() if k.startswith("lm_head "))
        attention = totals.get("attention", 0.0) - totals.get("attention linears", 0.0)
        per_step["step"].append(step)
        per_step["linears"].append(linears)
        per_step["lm_head"].append(head)
        per_step["attention"].append(attention)
        per_step["rest"].append(step - linears - head - attention)
        for key in hooks.groups:
            per_step[key].append(totals.get(key, 0.0))
        return out

    gen.decode_fn = timed_decode
    try:
        for _ in range(rounds):
            gen.run(input_ids, new_tokens)
    finally:
        hooks.remove()
    med = {k: statistics.median(v) for k, v in per_step.items()}
    groups = list(hooks.groups.values())
    for g in groups:
        g.ms_per_step = med[g.key]
    return Breakdown(
        step_ms=med["step"],
        categories={c: med[c] for c in CATEGORIES},
        groups=groups,
        steps=len(per_step["step"]),
        batch=input_ids.shape[0],
        hooks=len(hooks.handles) // 2,
        dtype=str(model_dtype(model)).replace("torch.", ""),
    )


_BACKEND_OF_FORMAT = {"dense": "dense", "2:4": "2:4", "bitmap": "bitmap", "masked": "masked"}


@dataclass
class Prediction:
    """Per-layer medians (M = batch) times the number of such linears per step, per group."""

    groups: dict[str, float]  # LinearGroup.key -> predicted ms per step
    linears_ms: float
    lm_head_ms: float
    layer_rows: list[dict]


def per_layer_prediction(breakdown: Breakdown, device: str = "cpu", min_time_s: float = 0.2) -> Prediction:
    """Time each of the breakdown's linear groups alone (``run_layers``, weights from DRAM) and add
    them up as the model calls them."""
    dtype = getattr(torch, breakdown.dtype)
    predicted: dict[str, float] = {}
    rows: list[dict] = []
    for g in breakdown.groups:
        backend = _BACKEND_OF_FORMAT[g.format]
        pattern = "2:4" if g.format == "2:4" else "0.5"
        shape = LinearShape("model", g.key, g.n, g.k)
        result = run_layers(
            [shape],
            (breakdown.batch,),
            pattern,
            (backend,),
            dtype,
            device,
            min_time_s=min_time_s,
            show_progress=False,
        )
        row = result.rows[0]
        predicted[g.key] = g.count * row.median_ms
        rows.append({"group": g.key, "count": g.count, **asdict(row), "env": {}})
    linears = sum(v for k, v in predicted.items() if k.startswith("linear "))
    head = sum(v for k, v in predicted.items() if k.startswith("lm_head "))
    return Prediction(predicted, linears, head, rows)


def consistency_rows(
    breakdown: Breakdown, prediction: Prediction, tpot_ms: float | None = None
) -> list[dict]:
    """In-model vs per-layer, per group and in total; ``tpot_ms``: the hook-free decode step."""
    rows = [
        {
            "what": g.key,
            "count": g.count,
            "in_model_ms": g.ms_per_step,
            "per_layer_ms": prediction.groups[g.key],
            "ratio": prediction.groups[g.key] / g.ms_per_step if g.ms_per_step else float("nan"),
        }
        for g in breakdown.groups
    ]
    in_model = breakdown.categories["linears"] + breakdown.categories["lm_head"]
    predicted = prediction.linears_ms + prediction.lm_head_ms
    rows.append(
        {
            "what": "all linears + lm_head",
            "count": sum(g.count for g in breakdown.groups),
            "in_model_ms": in_model,
            "per_layer_ms": predicted,
            "ratio": predicted / in_model,
        }
    )
    other = breakdown.categories["attention"] + breakdown.categories["rest"]
    step = tpot_ms if tpot_ms is not None else breakdown.step_ms
    rows.append(
        {
            "what": "decode step (per-layer linears + measured attention and rest)",
            "count": None,
            "in_model_ms": step,
            "per_layer_ms": predicted + other,
            "ratio": (predicted + other) / step,
        }
    )
    return rows


def breakdown_markdown(named: Sequence[tuple[str, Breakdown, Prediction, float | None]]) -> str:
    """One table of categories per variant, then in-model vs per-layer per group."""
    lines = [
        "| variant | decode step ms (hooked) | TPOT ms (no hooks) | linears | lm_head | attention | rest |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b, _, tpot in named:
        cats = " | ".join(
            f"{b.categories[c]:.2f} ({100 * b.categories[c] / b.step_ms:.0f}%)" for c in CATEGORIES
        )
        lines.append(f"| {name} | {b.step_ms:.2f} | {'-' if tpot is None else f'{tpot:.2f}'} | {cats} |")
    lines += [
        "",
        "| variant | what | count | in model ms/step | per-layer sum ms/step | per-layer / in-model |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, b, p, tpot in named:
        for r in consistency_rows(b, p, tpot):
            count = "" if r["count"] is None else r["count"]
            lines.append(
                f"| {name} | {r['what']} | {count} | {r['in_model_ms']:.2f} | {r['per_layer_ms']:.2f} | "
                f"{r['ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"
