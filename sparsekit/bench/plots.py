"""PNG plots for the benchmark reports (matplotlib, Agg backend) and the one report writer."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_speedups(rows: Sequence, path: str | Path, title: str | None = None) -> Path:
    """Speedup over the best dense baseline vs M, one panel per shape, one line per sparse backend."""
    plt = _pyplot()
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(f"{r.model} {r.layers}\n{r.n}x{r.k}", []).append(r)
    cols = min(4, max(1, len(groups)))
    nrows = max(1, math.ceil(len(groups) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, (label, grp) in zip(axes.flat, groups.items(), strict=False):
        backends = list(dict.fromkeys(r.backend for r in grp))
        for backend in backends:
            pts = sorted((r.m, r.speedup) for r in grp if r.backend == backend and math.isfinite(r.speedup))
            if not pts:
                continue
            style = "--" if backend.startswith("dense") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=backend)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("M (tokens)", fontsize=8)
        ax.set_ylabel("speedup vs best dense", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_e2e(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Bars of TTFT and TPOT (ms) per model variant."""
    plt = _pyplot()
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
        vals = [r[key] for r in rows]
        bars = ax.bar(names, vals, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(vals)])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_quality(rows: Sequence, path: str | Path, title: str | None = None) -> Path:
    """Perplexity per method, one bar group per pattern; dense as a horizontal line."""
    plt = _pyplot()
    dense = next((r.ppl for r in rows if r.method == "dense"), None)
    patterns = list(dict.fromkeys(r.sparsity for r in rows if r.method != "dense"))
    methods = list(dict.fromkeys(r.method for r in rows if r.method != "dense"))
    cell = {(r.method, r.sparsity): r.ppl for r in rows}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(patterns))]
        vals = [cell.get((method, p), float("nan")) for p in patterns]
        bars = ax.bar(xs, vals, width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    if dense is not None:
        ax.axhline(dense, color="black", lw=0.8, ls="--", label=f"dense {dense:.1f}")
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(patterns))], patterns)
    ax.set_ylabel("perplexity", fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(
    out: str | Path, stem: str, data: dict, markdown: str, plot: Callable[[Path], object]
) -> dict[str, Path]:
    """Write ``<stem>.json`` (``data``), ``<stem>.md`` and ``<stem>.png`` (``plot(path)``) into ``out``,
    each atomically; returns their paths by suffix. Without matplotlib (a bare GPU machine) the
    PNG is left out, with a warning."""
    import importlib.util
    import logging

    from sparsekit._io import write_json_atomic, write_text_atomic

    out = Path(out)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_json_atomic(paths["json"], data)
    write_text_atomic(paths["md"], markdown)
    if importlib.util.find_spec("matplotlib") is None:
        logging.getLogger(__name__).warning("matplotlib is not installed: %s.png not written", stem)
        del paths["png"]
        return paths
    tmp = out / f".{stem}.tmp.png"
    plot(tmp)
    os.replace(tmp, paths["png"])
    return paths
