"""Two code versions' per-layer speed from back-to-back ``bench/cpu_isa_layers.py`` runs.

    python bench/layer_runs_ratio.py BEFORE.json AFTER.json [BEFORE2.json AFTER2.json ...] [--out ratios.md]

A kernel change cannot be timed interleaved with the code it replaces (one extension per process),
so each version runs the same command back to back, and this script divides their medians: per
backend, dtype and M, the geometric mean over the cells both runs hold of before ms / after ms
(above 1: the after code is faster), one column per pair. Backends the change does not touch (dense,
the A/A ``dense-control``, other formats) are the control: their ratios are how far the machine
moved between the two runs. A second table gives each run's own speedup over dense (geometric mean
and cell range; ``--model`` keeps one model's shapes). Reads the JSON only; times nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sparsekit._io import print_and_write


def medians(report: dict) -> dict[tuple, float]:
    """(N, K, M, dtype, backend) -> median ms of one report."""
    return {(r["n"], r["k"], r["m"], r["dtype"], r["backend"]): r["median_ms"] for r in report["rows"]}


def ratios(before: dict, after: dict) -> dict[tuple, float]:
    """(backend, dtype, M) -> geometric mean of before / after over the cells both hold."""
    groups: dict[tuple, list[float]] = {}
    b, a = medians(before), medians(after)
    for key in sorted(b.keys() & a.keys()):
        groups.setdefault((key[4], key[3], key[2]), []).append(b[key] / a[key])
    if not groups:
        raise ValueError("the two reports share no (shape, M, dtype, backend) cell")
    return {key: statistics.geometric_mean(values) for key, values in groups.items()}


def table(pairs: list[tuple[str, str]]) -> str:
    """Markdown: one row per (backend, dtype, M), one column per before/after pair."""
    found = [ratios(json.loads(Path(b).read_text()), json.loads(Path(a).read_text())) for b, a in pairs]
    keys = sorted(set().union(*found))
    head = " | ".join(f"{Path(b).stem} / {Path(a).stem}" for b, a in pairs)
    lines = [f"| backend | dtype | M | {head} |", "|---|---|---:|" + "---:|" * len(pairs)]
    for key in keys:
        cells = " | ".join(f"{f[key]:.3f}" if key in f else "-" for f in found)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {cells} |")
    return "\n".join(lines) + "\n"


def speedups(report: dict, model: str | None = None) -> dict[tuple, tuple[float, float, float]]:
    """(backend, dtype, M) -> (geometric mean, min, max) of each cell's speedup over dense in that
    run, over the shapes of ``model`` (a row's ``model`` field, e.g. 'Llama-2-7B'; None: all)."""
    groups: dict[tuple, list[float]] = {}
    for r in report["rows"]:
        if model is None or r["model"] == model:
            groups.setdefault((r["backend"], r["dtype"], r["m"]), []).append(r["speedup"])
    if not groups:
        raise ValueError(f"no rows of model {model!r} in the report")
    return {k: (statistics.geometric_mean(v), min(v), max(v)) for k, v in groups.items()}


def speedup_table(paths: list[str], model: str | None) -> str:
    """Markdown: x dense within each run (geometric mean, cells min-max), one column per report."""
    found = [speedups(json.loads(Path(p).read_text()), model) for p in paths]
    keys = sorted(set().union(*found))
    head = " | ".join(Path(p).stem for p in paths)
    lines = [f"| backend | dtype | M | {head} |", "|---|---|---:|" + "---:|" * len(paths)]
    for key in keys:
        cells = " | ".join(
            f"{f[key][0]:.2f}x ({f[key][1]:.2f}-{f[key][2]:.2f})" if key in f else "-" for f in found
        )
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "reports", nargs="+", help="BEFORE.json AFTER.json, pairs of cpu_isa_layers.py reports"
    )
    parser.add_argument("--out", help="write the markdown tables here too")
    parser.add_argument(
        "--model", help="the speedup table over this model's shapes only (a row's model, e.g. Llama-2-7B)"
    )
    args = parser.parse_args(argv)
    if len(args.reports) % 2:
        parser.error("give the reports in before/after pairs (an even number of files)")
    pairs = list(zip(args.reports[::2], args.reports[1::2], strict=True))
    text = "Before ms / after ms, geometric mean over shapes (above 1: after is faster).\n\n" + table(pairs)
    scope = f"{args.model}'s shapes" if args.model else "all shapes"
    text += (
        f"\nSpeedup over dense within each run, {scope}: geometric mean (cells min-max).\n\n"
        + speedup_table(args.reports, args.model)
    )
    print_and_write(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
