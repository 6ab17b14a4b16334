"""How far the CPU runtime rule kept its promise in ``bench/cpu_isa_layers.py`` reports.

    python bench/rule_cells.py docs/data/cpu-rule-layers-epyc-x1.json [more.json ...] [--out summary.md]

Per report: the rule rows (``*-fastest``) below ``--floor`` times dense (default 0.95) and below
0.90, the A/A control's range (``dense-control``: the run's own noise), how many rule cells from
M = 16 up ran a held dense copy (and the megabytes those copies add) and how many at 1 < M < 16, the
decode speedups at M = 1 of the formats the issue names (2:4, bitmap 70%), and every miss with
what the rule measured when it decided (the ``rule measured`` note the rows carry since commit
793f1a3). Reads the JSON only; times nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from sparsekit._io import write_text_atomic

MEASURED = re.compile(r"rule measured sparse ([0-9.e+-]+) ms, dense ([0-9.e+-]+) ms")
HELD = re.compile(r"dense copy \(\+([0-9.]+) MB held\)")
DECODE_FORMATS = ("2:4-fastest", "bitmap-fastest=0.7")
PREFILL_M = 16  # copies are counted from here up (prefill, batches) and, apart, at 1 < M < 16


def summarise(report: dict, floor: float = 0.95) -> dict:
    """The rule's cells of one report: counts, ranges and the misses (dicts of plain numbers)."""
    rows = report["rows"]
    rule = [r for r in rows if "-fastest" in r["backend"]]
    if not rule:
        raise ValueError("this report has no -fastest rows: run cpu_isa_layers.py with rule backends")
    control = [r["speedup"] for r in rows if r["backend"] == "dense-control"]
    upper = [r for r in rule if r["m"] >= PREFILL_M]
    held = [float(m.group(1)) for r in upper if (m := HELD.search(r["impl"]))]
    small = [r for r in rule if 1 < r["m"] < PREFILL_M]
    held_small = sum(bool(HELD.search(r["impl"])) for r in small)
    decode: dict[str, list[float]] = {}
    for r in rule:
        base, _, isa = r["backend"].partition("@")
        if r["m"] == 1 and base in DECODE_FORMATS:
            decode.setdefault(f"{base} {isa or '-'} {r['dtype']}", []).append(r["speedup"])
    misses = []
    for r in sorted(rule, key=lambda r: r["speedup"]):
        if r["speedup"] >= floor:
            break
        seen = MEASURED.search(r["impl"])
        misses.append(
            {
                "cell": f"{r['backend']} {r['dtype']} {r['n']}x{r['k']} M={r['m']}",
                "speedup": r["speedup"],
                "path": "dense copy" if HELD.search(r["impl"]) else "sparse kernel",
                "rule_dense_over_sparse": float(seen.group(2)) / float(seen.group(1)) if seen else None,
            }
        )
    return {
        "command": report.get("command", ""),
        "rule_margin": report.get("rule_margin"),
        "rule_cells": len(rule),
        "below_floor": len(misses),
        "below_0.90": sum(m["speedup"] < 0.90 for m in misses),
        "control": (min(control), max(control)) if control else None,
        "cells_from_16": len(upper),
        "dense_held": len(held),
        "dense_held_mb": sum(held),
        "cells_small_m": len(small),
        "dense_held_small_m": held_small,
        "decode_geo": {k: statistics.geometric_mean(v) for k, v in decode.items()},
        "decode_min": min((min(v) for v in decode.values()), default=None),
        "misses": misses,
    }


def to_markdown(name: str, s: dict, floor: float) -> str:
    control = f"{s['control'][0]:.3f}-{s['control'][1]:.3f}x" if s["control"] else "none in the run"
    lines = [
        f"## {name}",
        "",
        f"`{s['command']}`",
        "",
        f"- rule margin {s['rule_margin']}; rule cells below {floor:.2f}x dense: **{s['below_floor']} of "
        f"{s['rule_cells']}** ({s['below_0.90']} below 0.90x)",
        f"- A/A control (dense-control over dense), per cell: {control}",
        f"- rule cells from M = {PREFILL_M} up running a held dense copy: {s['dense_held']} of "
        f"{s['cells_from_16']} ({s['dense_held_mb']:.0f} MB of copies over those cells); "
        f"at 1 < M < {PREFILL_M}: {s['dense_held_small_m']} of {s['cells_small_m']}",
    ]
    if s["decode_geo"]:
        geo = ", ".join(f"{k} {v:.2f}x" for k, v in sorted(s["decode_geo"].items()))
        lines.append(
            f"- decode (M = 1) geometric means over the shapes: {geo}; slowest cell {s['decode_min']:.2f}x"
        )
    if s["misses"]:
        lines += [
            "",
            "| miss | x dense | path the rule chose | rule's dense / sparse time |",
            "|---|---:|---|---:|",
        ]
        for m in s["misses"]:
            seen = f"{m['rule_dense_over_sparse']:.3f}" if m["rule_dense_over_sparse"] is not None else "-"
            lines.append(f"| {m['cell']} | {m['speedup']:.3f} | {m['path']} | {seen} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reports", nargs="+", help="cpu_isa_layers.py JSON reports")
    parser.add_argument("--floor", type=float, default=0.95, help="a rule cell below this x dense is a miss")
    parser.add_argument("--out", default=None, help="also write the summary to this .md file")
    args = parser.parse_args(argv)
    missing = [p for p in args.reports if not Path(p).is_file()]
    if missing:
        parser.error(f"no such report: {', '.join(missing)}")
    parts = []
    for path in args.reports:
        try:
            summary = summarise(json.loads(Path(path).read_text()), args.floor)
        except (KeyError, ValueError) as exc:
            parser.error(f"{path}: {exc}")
        parts.append(to_markdown(Path(path).name, summary, args.floor))
    text = "\n".join(parts)
    print(text)
    if args.out:
        command = (
            f"python bench/rule_cells.py {' '.join(args.reports)} --floor {args.floor:g} --out {args.out}"
        )
        write_text_atomic(Path(args.out), f"# The CPU rule's cells\n\n`{command}`\n\n{text}")


if __name__ == "__main__":
    main()
