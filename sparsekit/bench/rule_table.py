"""A CPU rule decision table measured in the model's own forward (``sparsekit bench rule-table``).

The first-call rule (``sparsekit.nn.cpu_rule``) times each layer shape once, alone, on its first
forward in an M class. What runs between a layer's calls in a model changes its speed (a blas-path
int8 layer ran 0.76-0.94x dense in one context and 1.06-1.52x in another: docs/results.md), so this
benchmark times every SparseLinear where it runs: inside ``model(ids)`` with ids [1, m], once with
all of the class's decisions pinned to the sparse kernel and once pinned to the dense copy,
alternating which goes first, ``rounds`` times after one untimed round. A forward hook pair sums each
layer's time per decision key (format, ISA, dtype, N, K, M class); medians decide, with
``TABLE_MARGIN`` (0: whichever measured faster). The first-call rule leans to dense
(``cpu_rule.MARGIN``, -0.1) because its one measurement, made alone, and a later one inside a model
parted by up to about 10%; this one is made in the model, where the layer will run, so a sparse
kernel measured 6% faster there keeps its layer (and the memory). The decisions are pinned in this process and
written as a table that ``cpu_rule_table.load_table`` / ``SPARSEKIT_CPU_RULE_TABLE`` pin at load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsekit.bench.timing import quantiles
from sparsekit.models import model_device
from sparsekit.nn import SparseLinear, cpu_rule
from sparsekit.nn.cpu_rule_table import entry_key

log = logging.getLogger(__name__)

M_CLASSES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TABLE_MARGIN = 0.0  # dense is chosen when dense_ms < (1 - margin) * sparse_ms


@dataclass
class RuleTable:
    """What ``measure_rule_table`` measured: table entries (``cpu_rule_table`` format), the bytes of
    dense copies the decisions make the model hold, and the model's stored SparseLinear bytes."""

    entries: list[dict] = field(default_factory=list)
    copy_bytes: int = 0
    copy_bytes_up_to: dict[int, int] = field(default_factory=dict)  # M class -> copies held running M <= it
    sparse_bytes: int = 0
    layers: int = 0
    rounds: int = 0
    margin: float = TABLE_MARGIN


def check_m_classes(m_classes: tuple[int, ...]) -> tuple[int, ...]:
    """Each M a class the rule decides: a power of 2 from MIN_M to 1024."""
    if not m_classes:
        raise ValueError("no M classes to measure; give e.g. --m 16,64,512")
    bad = [m for m in m_classes if not cpu_rule.is_decided_class(m)]
    if bad:
        raise ValueError(
            f"M {bad} are not classes the CPU rule decides: use powers of 2 from {cpu_rule.MIN_M} to 1024 "
            f"(M = 1 always runs the sparse kernel)"
        )
    return tuple(sorted(set(m_classes)))


def _sparse_layers(model: nn.Module) -> list[SparseLinear]:
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if not layers:
        raise ValueError(
            "the model has no SparseLinear layers, so there is nothing for the CPU rule to decide: "
            "prune and save it first (`sparsekit prune MODEL --sparsity 2:4 --out DIR`) and measure DIR"
        )
    if model_device(model).type != "cpu":
        raise ValueError(f"the CPU rule table is measured on the CPU; the model is on {model_device(model)}")
    return layers


def _vocab(model: nn.Module) -> int:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise ValueError("the model has no input embeddings to feed token ids through")
    return embed.num_embeddings


def _timing_hooks(layers: list[SparseLinear], keys: dict[int, tuple], acc: dict[tuple, float]) -> list:
    """Forward hooks adding each layer's wall time to ``acc[its key]`` (seconds)."""
    started: dict[int, float] = {}

    def pre(module, args):
        started[id(module)] = time.perf_counter()

    def post(module, args, out):
        acc[keys[id(module)]] += time.perf_counter() - started[id(module)]

    return [
        h
        for layer in layers
        for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))
    ]


def _measure_class(
    model: nn.Module, layers: list[SparseLinear], m: int, rounds: int, margin: float
) -> list[dict]:
    keys = {id(layer): layer.rule_key(m) for layer in layers}
    distinct = sorted(set(keys.values()))
    ids = torch.randint(_vocab(model), (1, m), generator=torch.Generator().manual_seed(m))
    times: dict[str, dict[tuple, list[float]]] = {
        side: {k: [] for k in distinct} for side in ("sparse", "dense")
    }
    acc = dict.fromkeys(distinct, 0.0)
    hooks = _timing_hooks(layers, keys, acc)
    try:
        with torch.no_grad():
            for turn in range(rounds + 1):  # turn 0 untimed: plans, dense copies, first-touch pages
                for side in ("sparse", "dense") if turn % 2 else ("dense", "sparse"):
                    for key in distinct:
                        cpu_rule.pin(key, side == "dense")
                    acc.update(dict.fromkeys(distinct, 0.0))
                    model(input_ids=ids, use_cache=False)
                    if turn:
                        for key in distinct:
                            times[side][key].append(acc[key] * 1e3)
    finally:
        for hook in hooks:
            hook.remove()
    entries = []
    for key in distinct:
        sparse, s20, s80 = quantiles(times["sparse"][key])
        dense, d20, d80 = quantiles(times["dense"][key])
        fmt, isa, dtype, n, k, bucket = key
        entries.append(
            {
                "format": fmt, "isa": isa, "dtype": dtype, "n": n, "k": k, "m_class": bucket,
                "layers": sum(1 for v in keys.values() if v == key),
                "sparse_ms": sparse, "dense_ms": dense, "dense_won": dense < (1.0 - margin) * sparse,
                "sparse_p20_ms": s20, "sparse_p80_ms": s80, "dense_p20_ms": d20, "dense_p80_ms": d80,
            }
        )  # fmt: skip
    return entries


def measure_rule_table(
    model: nn.Module,
    m_classes: tuple[int, ...] = M_CLASSES,
    rounds: int = 5,
    margin: float = TABLE_MARGIN,
    show_progress: bool = True,
) -> RuleTable:
    """Time every SparseLinear of ``model`` (CPU) in its forward, sparse kernel vs dense copy, per M
    class in ``m_classes``; pin the decisions in this process and return them as a table.

    Each layer's rule is 'fastest' while measuring and is restored after; dense copies made for the
    measurement are dropped (a layer under 'fastest' remakes the ones its decisions call for).
    Cost: 2 * (rounds + 1) forwards of [1, m] token ids per class."""
    from tqdm.auto import tqdm

    m_classes = check_m_classes(tuple(m_classes))
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if not -0.5 <= margin < 1:
        raise ValueError(
            f"margin must be in [-0.5, 1) (dense wins below (1 - margin) x sparse), got {margin}"
        )
    layers = _sparse_layers(model)
    prior = [layer.cpu_rule for layer in layers]
    cpu_rule.apply(model, "fastest")
    touched = {layer.rule_key(m) for layer in layers for m in m_classes}
    before = {key: (cpu_rule.decided(key), cpu_rule.measured(key)) for key in touched}
    entries: list[dict] = []
    try:
        for m in tqdm(m_classes, desc="rule table: M classes", disable=not show_progress):
            found = _measure_class(model, layers, m, rounds, margin)
            log.info("rule table M %d: %d keys, %d dense", m, len(found), sum(e["dense_won"] for e in found))
            entries += found
    except BaseException:
        cpu_rule.forget(touched)  # the measurement's pins undone: what was decided before stands
        for key, (won, ms) in before.items():
            if won is not None:
                cpu_rule.pin(key, won, ms)
        raise
    finally:
        for layer, rule in zip(layers, prior, strict=True):
            layer.cpu_rule = "sparse"  # drops the measurement's dense copy and plans
            layer.cpu_rule = rule
    for entry in entries:
        cpu_rule.pin(entry_key(entry), entry["dense_won"], (entry["sparse_ms"], entry["dense_ms"]))
    return RuleTable(
        entries=entries,
        copy_bytes=_copy_bytes(layers, entries),
        copy_bytes_up_to={
            m: _copy_bytes(layers, entries, {c for c in m_classes if c <= m}) for m in m_classes
        },
        sparse_bytes=sum(layer.weight_bytes() for layer in layers),
        layers=len(layers),
        rounds=rounds,
        margin=margin,
    )


def _copy_bytes(layers: list[SparseLinear], entries: list[dict], classes: set[int] | None = None) -> int:
    """Bytes of the dense copies the layers hold once every class in ``classes`` (default: every
    measured one) has run: a layer holds one when any of them decided dense for its key."""
    dense = {entry_key(e) for e in entries if e["dense_won"]}
    classes = {e["m_class"] for e in entries} if classes is None else classes
    total = 0
    for layer in layers:
        if any(layer.rule_key(m) in dense for m in classes):
            total += layer.out_features * layer.in_features * layer.dtype.itemsize
    return total


def _spread(entry: dict, side: str) -> str:
    return f"{entry[f'{side}_ms']:.3f} [{entry[f'{side}_p20_ms']:.3f}-{entry[f'{side}_p80_ms']:.3f}]"


def table_markdown(table: RuleTable, title: str) -> str:
    """The table as markdown: one row per key, the ratio dense / sparse and the decision."""
    lines = [
        f"# CPU rule table: {title}",
        "",
        f"{table.layers} SparseLinear layers, {table.sparse_bytes / 2**20:.1f} MiB stored; dense copies "
        f"the decisions hold: {table.copy_bytes / 2**20:.1f} MiB. Medians of {table.rounds} rounds in the "
        f"model's forward (p20-p80 in brackets); dense wins below {1 - table.margin:.2f} x sparse.",
        "",
        "Dense copies held by a model that runs M up to a class: "
        + ", ".join(f"{m}: {b / 2**20:.1f} MiB" for m, b in sorted(table.copy_bytes_up_to.items()))
        + " (a table measured with `--m` up to that class holds no more).",
        "",
        "| format | isa | dtype | N x K | M | layers | sparse ms | dense ms | sparse speedup | runs |",
        "|---|---|---|---|---:|---:|---|---|---:|---|",
    ]
    for e in sorted(table.entries, key=lambda e: (e["dtype"], e["format"], e["m_class"], e["n"], e["k"])):
        lines.append(
            f"| {e['format']} | {e['isa']} | {e['dtype'].removeprefix('torch.')} | {e['n']} x {e['k']} | "
            f"{e['m_class']} | {e['layers']} | {_spread(e, 'sparse')} | {_spread(e, 'dense')} | "
            f"{e['dense_ms'] / e['sparse_ms']:.2f}x | {'dense' if e['dense_won'] else 'sparse'} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "M_CLASSES",
    "TABLE_MARGIN",
    "RuleTable",
    "check_m_classes",
    "measure_rule_table",
    "table_markdown",
]
