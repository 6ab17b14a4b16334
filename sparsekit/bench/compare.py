"""Every method family on one model, one calibration set and one evaluation: quality and speed.

Each ``Variant`` is pruned from a fresh copy of the same dense model with the same calibration
tokens, then measured the same way: perplexity on the same held-out tokens, zero-shot accuracy on
the same lm-evaluation-harness tasks and items, parameters and bytes as stored (unstructured and
N:M variants in their compressed SparseLinear form, structured ones as the smaller dense model
they are), and TTFT / TPOT with every variant's generations interleaved in rounds.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsekit.api import prune
from sparsekit.bench.e2e import time_generation_interleaved
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.models import model_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """A named recipe: ``steps`` of (method, sparsity, keywords) applied in order to a dense copy.

    family: 'dense' | 'unstructured' | 'N:M' | 'depth' | 'width' | 'width+N:M' | 'quantized' |
    'N:M+quantized' | 'width+quantized'. ``sparsify``: swap pruned linears for compressed
    SparseLinear layers before the size and speed measurements. ``quantize``: weight-only
    quantization ('int8', 'int4', ...; ``sparsekit.nn.quantize``, 2:4 layers become 2:4-int8)
    applied after the steps and before any evaluation, so the quality columns include its error;
    ``quantize_head``: the lm_head too (``quantize(head=True)``).
    """

    name: str
    family: str
    steps: tuple[tuple[str, str, tuple[tuple[str, object], ...]], ...] = ()
    sparsify: bool = False
    quantize: str | None = None
    quantize_head: bool = False

    def apply(self, model: nn.Module, calib: torch.Tensor, show_progress: bool = False) -> None:
        for method, sparsity, keywords in self.steps:
            prune(
                model,
                method=method,
                sparsity=sparsity,
                calib=calib,
                show_progress=show_progress,
                **dict(keywords),
            )


def _step(method: str, sparsity: str, **keywords: object) -> tuple[str, str, tuple[tuple[str, object], ...]]:
    return (method, sparsity, tuple(sorted(keywords.items())))


def unstructured(method: str, sparsity: str, **steps: object) -> Variant:
    """``steps``: PruneConfig's composition keywords (update='admm', refine='dsnot', permute=True)."""
    family = "N:M" if ":" in sparsity else "unstructured"
    label = sparsity if ":" in sparsity else f"{round(100 * float(sparsity))}%"
    recipe = "+".join([method] + [k if v is True else str(v) for k, v in steps.items()])
    return Variant(f"{recipe} {label}", family, (_step(method, sparsity, **steps),), sparsify=True)


def depth(method: str, blocks: int, repair: bool = True) -> Variant:
    name = f"{method} -{blocks} blocks" + (" +repair" if repair else "")
    return Variant(name, "depth", (_step(method, "0", remove_layers=blocks, repair=repair),))


def width(method: str, fraction: float, widths: str = "uniform", then: str | None = None) -> Variant:
    name = f"{method} {round(100 * fraction)}%" + (" adaptive" if widths == "adaptive" else "")
    steps = (_step(method, str(fraction), widths=widths),)
    if then is None:
        return Variant(name, "width", steps)
    return Variant(
        f"{name} + sparsegpt {then}", "width+N:M", (*steps, _step("sparsegpt", then)), sparsify=True
    )


def quantized(base: Variant, fmt: str, head: bool = False) -> Variant:
    """``base`` then weight-only ``fmt`` (int8 on its 2:4 layers: 2:4-int8); ``head``: the lm_head too."""
    family = "quantized" if base.family == "dense" else f"{base.family.split('+')[0]}+quantized"
    name = (fmt if base.family == "dense" else f"{base.name} + {fmt}") + (" (head too)" if head else "")
    return Variant(name, family, base.steps, sparsify=False, quantize=fmt, quantize_head=head)


DENSE = Variant("dense", "dense")
DEMO_VARIANTS = (
    DENSE,
    unstructured("magnitude", "2:4"),
    unstructured("wanda", "0.5"),
    unstructured("sparsegpt", "2:4"),
    unstructured("sparsegpt", "2:4", update="admm"),
    depth("angular", 6),
    width("flap", 0.2),
    # weight-only quantization beside the pruning families and combined with two of them; the
    # lm_head too, as torchao's quantize_ and llama.cpp's Q8_0 / Q4 files do
    quantized(DENSE, "int8", head=True),
    quantized(DENSE, "int4", head=True),
    quantized(unstructured("sparsegpt", "2:4"), "int8", head=True),
    quantized(width("flap", 0.2), "int8", head=True),
)
FULL_VARIANTS = (
    DENSE,
    unstructured("magnitude", "0.5"),
    unstructured("magnitude", "2:4"),
    unstructured("wanda", "0.5"),
    unstructured("wanda", "2:4"),
    unstructured("sparsegpt", "0.5"),
    unstructured("sparsegpt", "2:4"),
    unstructured("sparsegpt", "2:4", update="admm"),
    depth("angular", 6),
    width("flap", 0.2),
    width("flap", 0.2, widths="adaptive"),
    quantized(DENSE, "int8"),
    quantized(DENSE, "int4"),
    quantized(unstructured("sparsegpt", "2:4"), "int8"),
    quantized(width("flap", 0.2), "int8"),
)


@dataclass
class CompareRow:
    variant: str
    family: str
    ppl: float
    params: int  # parameters of the model as stored (structured pruning removes them)
    nonzero_params: int  # parameters that are not pruned zeros
    bytes: int  # parameter + buffer bytes as measured (compressed layers for sparsified variants)
    prune_s: float
    zero_shot: dict[str, dict] = field(default_factory=dict)  # task -> {metric, value, stderr}
    mean_accuracy: float | None = None
    timing: dict = field(default_factory=dict)  # ttft/tpot medians and p20/p80
    decode_speedup: float | None = None  # dense TPOT / this TPOT
    prefill_speedup: float | None = None
    checkpoint_bytes: int | None = None  # model.safetensors written by sparsekit.save (when measured)


def _nonzero_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters) of a model of plain layers, tied parameters once."""
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params), sum(int(p.count_nonzero()) for p in params)


def _zero_shot_cells(result) -> dict[str, dict]:
    cells = {}
    for task, score in result.scores.items():
        metric, value, stderr = score.main
        cells[task] = {"metric": metric, "value": value, "stderr": stderr, "items": score.items}
    return cells


def compare_variants(
    model: nn.Module,
    tokenizer,
    variants: Sequence[Variant],
    calib: torch.Tensor,
    eval_ids: torch.Tensor,
    eval_seqlen: int = 512,
    tasks: Sequence[str] = ("wiki_lambada", "wiki_continuation"),
    limits: dict[str, int] | None = None,
    prompt_ids: torch.Tensor | None = None,
    new_tokens: int = 32,
    rounds: int = 5,
    zero_shot_batch: int = 8,
    show_progress: bool = True,
    checkpoint_bytes: bool = False,
    on_row=None,
) -> list[CompareRow]:
    """Prune, evaluate and time every variant (``model`` itself is left unchanged).

    limits: items per task (None: every item). ``prompt_ids`` [1, P]: the generation prompt (no
    timing when None). All variants stay resident so their generations can interleave.
    ``checkpoint_bytes``: also save each variant with ``sparsekit.save`` to a temporary folder and
    record its size (what fused MoE experts take compressed on disk, while in memory they are dense).
    ``on_row(rows)`` is called after every variant's quality row (before any timing), so a caller
    can write what a long run has so far.
    """
    from sparsekit.eval.zero_shot import task_manager, zero_shot
    from sparsekit.nn import quantize, sparsify

    manager = task_manager(list(tasks), None) if tasks else None
    rows, timed = [], {}
    for variant in variants:
        pruned = copy.deepcopy(model).eval()
        start = time.perf_counter()
        variant.apply(pruned, calib, show_progress=show_progress)
        prune_s = time.perf_counter() - start
        params, nonzero = _nonzero_params(pruned)  # counted before any layer is compressed
        if variant.quantize:
            quantize(pruned, variant.quantize, head=variant.quantize_head)
        ppl = perplexity_of_ids(pruned, eval_ids, eval_seqlen).ppl
        cells, mean = {}, None
        for task in tasks:
            limit = (limits or {}).get(task)
            result = zero_shot(
                pruned, [task], tokenizer, limit=limit, batch_size=zero_shot_batch, manager=manager
            )
            cells |= _zero_shot_cells(result)
        if cells:
            mean = sum(c["value"] for c in cells.values()) / len(cells)
        if variant.sparsify:
            sparsify(pruned, format="auto")
        rows.append(
            CompareRow(
                variant.name, variant.family, ppl, params, nonzero, model_bytes(pruned), prune_s, cells, mean
            )
        )
        if checkpoint_bytes:
            rows[-1].checkpoint_bytes = _saved_size(pruned)
        log.info(
            "%s: ppl %.2f, mean accuracy %s, %.1f M non-zero params, %.1f MiB, pruned in %.1f s",
            variant.name,
            ppl,
            f"{mean:.3f}" if mean is not None else "-",
            nonzero / 1e6,
            rows[-1].bytes / 2**20,
            prune_s,
        )
        timed[variant.name] = pruned
        if on_row is not None:
            on_row(rows)
    if prompt_ids is not None:
        timing = time_generation_interleaved(
            timed, prompt_ids, new_tokens, rounds, show_progress=show_progress
        )
        base = timing.get(DENSE.name, next(iter(timing.values())))
        for row in rows:
            row.timing = timing[row.variant]
            row.decode_speedup = base["tpot_ms"] / row.timing["tpot_ms"]
            row.prefill_speedup = base["ttft_ms"] / row.timing["ttft_ms"]
    return rows


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.0f}" if n is not None else "-"


def _saved_size(model: nn.Module) -> int:
    """Bytes of the model.safetensors ``sparsekit.save`` writes for ``model``."""
    from sparsekit.hf.checkpoint import WEIGHTS_NAME, save

    with tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "m")
        return (Path(tmp) / "m" / WEIGHTS_NAME).stat().st_size


def pareto_front(rows: Sequence[CompareRow]) -> list[str]:
    """Variants no other variant beats on both decode speed and mean accuracy (ties kept)."""
    points = [(r.variant, r.decode_speedup, r.mean_accuracy) for r in rows]
    points = [p for p in points if p[1] is not None and p[2] is not None]
    return [
        name
        for name, speed, acc in points
        if not any(s >= speed and a >= acc and (s > speed or a > acc) for _, s, a in points)
    ]


def compare_markdown(rows: Sequence[CompareRow]) -> str:
    """One row per variant: family, ppl, each task's headline metric ± stderr, mean, size, speed."""
    tasks = list(dict.fromkeys(t for r in rows for t in r.zero_shot))
    front = set(pareto_front(rows))
    head = ["variant", "family", "ppl", *[f"{t} ({rows[0].zero_shot[t]['metric']})" for t in tasks]]
    disk = any(r.checkpoint_bytes is not None for r in rows)
    head += ["mean acc", "params (M)", "non-zero (M)", "MiB", *(["disk MiB"] if disk else [])]
    head += ["TPOT ms (p20-p80)", "decode x", "prefill x"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        accs = [f"{r.zero_shot[t]['value']:.3f} ± {r.zero_shot[t]['stderr'] or 0:.3f}" for t in tasks]
        t = r.timing
        tpot = f"{t['tpot_ms']:.1f} ({t['tpot_p20_ms']:.1f}-{t['tpot_p80_ms']:.1f})" if t else "-"
        name = f"**{r.variant}**" if r.variant in front else r.variant
        cells = [
            name,
            r.family,
            f"{r.ppl:.2f}",
            *accs,
            f"{r.mean_accuracy:.3f}" if r.mean_accuracy is not None else "-",
            f"{r.params / 1e6:.1f}",
            f"{r.nonzero_params / 1e6:.1f}",
            f"{r.bytes / 2**20:.0f}",
            *([_mib(r.checkpoint_bytes)] if disk else []),
            tpot,
            f"{r.decode_speedup:.2f}" if r.decode_speedup else "-",
            f"{r.prefill_speedup:.2f}" if r.prefill_speedup else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Bold: on the Pareto front of mean accuracy vs decode speed. ± is the harness's standard error."
    )
    return "\n".join(lines)


def plot_pareto(rows: Sequence[CompareRow], path, title: str | None = None):
    """Mean zero-shot accuracy (left) and perplexity (right, log) against decode speedup."""
    from sparsekit.bench.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {
        "dense": "black",
        "unstructured": "#4c72b0",
        "N:M": "#dd8452",
        "depth": "#55a868",
        "width": "#c44e52",
        "width+N:M": "#8172b3",
        "quantized": "#937860",
        "N:M+quantized": "#da8bc3",
        "width+quantized": "#8c8c8c",
        "unstructured+quantized": "#64b5cd",
    }
    front = pareto_front(rows)
    for ax, key, label in (
        (axes[0], "mean_accuracy", "mean zero-shot accuracy"),
        (axes[1], "ppl", "perplexity"),
    ):
        for family in dict.fromkeys(r.family for r in rows):
            pts = [r for r in rows if r.family == family and r.decode_speedup and getattr(r, key) is not None]
            ax.scatter(
                [r.decode_speedup for r in pts],
                [getattr(r, key) for r in pts],
                color=colors.get(family, "gray"),
                label=family,
                s=28,
            )
            for r in pts:
                ax.annotate(
                    r.variant,
                    (r.decode_speedup, getattr(r, key)),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel("decode speedup vs dense (TPOT)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.axvline(1.0, color="gray", lw=0.6, ls=":")
        ax.tick_params(labelsize=7)
    on_front = sorted((r for r in rows if r.variant in front), key=lambda r: r.decode_speedup)
    axes[0].plot(
        [r.decode_speedup for r in on_front],
        [r.mean_accuracy for r in on_front],
        color="gray",
        lw=0.8,
        ls="--",
        label="Pareto front",
    )
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_to_dicts(rows: Sequence[CompareRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def table_writers(out: Path, head: str, meta: dict, total: int):
    """(write, partial) for a table script: ``write(rows, note="")`` writes <out>.json (``meta`` +
    the rows) and <out>.md (``head`` + note + the table), atomically; ``partial(rows)`` is the
    ``on_row`` callback of ``compare_variants``, so a run cut short keeps its rows (no timing yet)."""
    from sparsekit._io import write_json_atomic, write_text_atomic

    def write(rows: Sequence[CompareRow], note: str = "") -> None:
        write_json_atomic(out.with_suffix(".json"), {**meta, "rows": rows_to_dicts(rows)})
        write_text_atomic(out.with_suffix(".md"), head + note + compare_markdown(rows) + "\n")

    def partial(rows: Sequence[CompareRow]) -> None:
        write(rows, f"**Partial: {len(rows)} of {total} rows, decode timing not run yet.**\n\n")

    return write, partial
