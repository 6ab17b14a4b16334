"""glibc's heap kept while pruning (``sparsekit._memory.retained_heap``) against glibc's defaults.

    python bench/heap_ab.py --rows wanda/2:4/two sparsegpt/2:4/one --rounds 3 --out reports/heap_ab

Each prune runs in its own process (malloc's settings last for the process), with
``SPARSEKIT_RETAIN_HEAP=1`` (the default: the heap kept) or ``=0`` (glibc's own thresholds); per
round every row runs both, in alternating order, so slow and fast stretches of the machine fall on
both. A row is METHOD/SPARSITY/PASSES (PASSES ``one``, ``two`` or ``auto``). Protocol of issue 28:
SmolLM2-135M fp32, 64 x 512 calibration tokens of the offline corpus (seed 0), 2 threads. Per
prune: wall seconds of ``sparsekit.prune``, its user and system CPU seconds and minor page faults
(``getrusage``), and a hash of the pruned weights (both settings must prune identically). Writes
<out>.json and <out>.md after every prune.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {"retained": "1", "glibc": "0"}
PASSES = {"one": True, "two": False, "auto": None}


def parse_row(text: str) -> tuple[str, str, str]:
    """'wanda/2:4/two' -> ('wanda', '2:4', 'two'); raises ValueError naming the accepted form."""
    parts = text.split("/")
    if len(parts) != 3 or parts[2] not in PASSES or not parts[0] or not parts[1]:
        raise ValueError(f"row {text!r}: write METHOD/SPARSITY/PASSES, PASSES one of {tuple(PASSES)}")
    return parts[0], parts[1], parts[2]


def child(row: str, nsamples: int, seqlen: int) -> dict:
    """One prune in this process: its wall, CPU and fault counts and a hash of the weights."""
    import resource
    import time

    import torch

    import sparsekit
    from sparsekit.hf.data import calibration_ids
    from sparsekit.hf.models import load_model

    method, sparsity, passes = parse_row(row)
    torch.set_num_threads(2)
    model, tok = load_model("smollm2", dtype=torch.float32)
    calib = calibration_ids(tok, "wiki-offline", nsamples, seqlen, seed=0)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    report = sparsekit.prune(
        model, method=method, sparsity=sparsity, calib=calib, show_progress=False, sequential=PASSES[passes]
    )
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return {
        "wall_s": wall,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "timings_s": report.timings_s,
        "weights_sha256": digest.hexdigest()[:16],
    }


def run_child(row: str, setting: str, nsamples: int, seqlen: int) -> dict:
    env = dict(os.environ, SPARSEKIT_RETAIN_HEAP=SETTINGS[setting])
    env.pop("GLIBC_TUNABLES", None)
    command = [sys.executable, __file__, "--child", row, "--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{row} ({setting}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(rows: list[dict]) -> list[dict]:
    """Per row and setting: medians and ranges of wall, sys and faults; per row, the retained heap's
    wall over glibc's (median over rounds of the per-round ratio) and whether the weights agree."""
    out = []
    for row in dict.fromkeys(r["row"] for r in rows):
        mine = [r for r in rows if r["row"] == row]
        entry: dict = {"row": row}
        for setting in SETTINGS:
            runs = [r for r in mine if r["setting"] == setting]
            for key in ("wall_s", "sys_s", "minor_faults"):
                values = [r[key] for r in runs]
                entry[f"{setting}_{key}"] = statistics.median(values) if values else None
                entry[f"{setting}_{key}_range"] = [min(values), max(values)] if values else None
        by_round = {}
        for r in mine:
            by_round.setdefault(r["round"], {})[r["setting"]] = r["wall_s"]
        ratios = [d["retained"] / d["glibc"] for d in by_round.values() if len(d) == 2]
        entry["wall_ratio"] = statistics.median(ratios) if ratios else None
        entry["wall_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
        entry["same_weights"] = len({r["weights_sha256"] for r in mine}) == 1
        out.append(entry)
    return out


def markdown(head: str, rows: list[dict]) -> str:
    lines = [head, "", "| row | round | setting | wall s | user s | sys s | minor faults | weights |",
             "|---|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['round']} | {r['setting']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | "
            f"{r['sys_s']:.1f} | {r['minor_faults']:,} | {r['weights_sha256']} |"
        )
    lines += [
        "",
        "Medians over rounds [range]; ratio: retained wall / glibc wall, per round, median [range]:",
        "",
        "| row | glibc wall s | retained wall s | ratio | glibc sys s | retained sys s | glibc faults | "
        "retained faults | same weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary(rows):
        if s["wall_ratio"] is None:
            continue
        g, k = s["glibc_wall_s_range"], s["retained_wall_s_range"]
        ratio = s["wall_ratio_range"]
        lines.append(
            f"| {s['row']} | {s['glibc_wall_s']:.1f} [{g[0]:.1f}-{g[1]:.1f}] | {s['retained_wall_s']:.1f} "
            f"[{k[0]:.1f}-{k[1]:.1f}] | {s['wall_ratio']:.3f} [{ratio[0]:.3f}-{ratio[1]:.3f}] | "
            f"{s['glibc_sys_s']:.1f} | {s['retained_sys_s']:.1f} | {s['glibc_minor_faults']:,.0f} | "
            f"{s['retained_minor_faults']:,.0f} | {'yes' if s['same_weights'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/heap_ab")
    p.add_argument("--rows", nargs="+", default=["wanda/2:4/two"], metavar="METHOD/SPARSITY/PASSES")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--child", metavar="ROW", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        for row in [args.child] if args.child else args.rows:
            parse_row(row)
    except ValueError as exc:
        p.error(str(exc))
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: give at least 1")
    if args.child:
        print(json.dumps(child(args.child, args.nsamples, args.seqlen)))
        return 0
    from sparsekit._env import environment, run_line
    from sparsekit._io import write_json_atomic, write_text_atomic

    env = environment()
    head = (
        f"{run_line('bench/heap_ab.py', argv, env)}; SmolLM2-135M fp32, calibration {args.nsamples} x "
        f"{args.seqlen} (seed 0), each prune in its own process."
    )
    out, rows = Path(args.out), []
    for round_ in range(args.rounds):
        order = list(SETTINGS) if round_ % 2 == 0 else list(reversed(SETTINGS))
        for row in args.rows:
            for setting in order:
                result = run_child(row, setting, args.nsamples, args.seqlen)
                rows.append({"row": row, "round": round_, "setting": setting, **result})
                print(f"{row} round {round_} {setting}: {result['wall_s']:.1f} s", file=sys.stderr)
                doc = {"environment": env, "args": vars(args), "rows": rows, "summary": summary(rows)}
                write_json_atomic(out.with_suffix(".json"), doc)
                write_text_atomic(out.with_suffix(".md"), markdown(head, rows))
    print(markdown(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
