"""Prune time of two source trees (before / after a refactor) on the real model, interleaved.

    git worktree add /tmp/before HEAD~1
    python bench/prune_time_ab.py --trees /tmp/before . --rounds 3 --out reports/prune_time_ab

Each run is a fresh process with ``PYTHONPATH=<tree>`` that loads SmolLM2, takes the same
calibration (``--nsamples`` x ``--seqlen`` of the offline corpus, seed 0) and times
``sparsekit.prune`` alone; rounds alternate the trees for every method, so drift of the machine
falls on both alike. Reports the median and the spread (min, max) per tree and method, and the
ratio after / before of the medians. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic

CHILD = """
import json, sys, time, torch
import sparsekit
from sparsekit.hf.data import calibration_ids
from sparsekit.hf.models import load_model
torch.set_num_threads({threads})
model, tok = load_model("smollm2")
ids = calibration_ids(tok, "wiki-offline", {nsamples}, {seqlen}, 0)
kw = json.loads({kwargs!r})
started = time.perf_counter()
sparsekit.prune(model, calib=ids, show_progress=False, **kw)
print("SECONDS", time.perf_counter() - started)
"""


def run_once(tree: str, kwargs: dict, nsamples: int, seqlen: int, threads: int) -> float:
    code = CHILD.format(kwargs=json.dumps(kwargs), nsamples=nsamples, seqlen=seqlen, threads=threads)
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    if out.returncode:
        raise RuntimeError(f"{tree} {kwargs}: {out.stderr[-2000:]}")
    return float(next(line for line in out.stdout.splitlines() if line.startswith("SECONDS")).split()[1])


def parse_method(text: str) -> dict:
    """'wanda:2:4' -> {method: wanda, sparsity: '2:4'}; 'angular:0.1:repair' adds repair=True."""
    method, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    flags = [p for p in parts if p.isalpha()]
    sparsity = ":".join(p for p in parts if not p.isalpha())
    return {"method": method, "sparsity": sparsity} | {f: True for f in flags}


def _label(kwargs: dict) -> str:
    """{method: ria, sparsity: 2:4, permute: True} -> 'ria 2:4 permute'."""
    return " ".join(k if v is True else str(v) for k, v in kwargs.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    p.add_argument("--methods", default="wanda:2:4,sparsegpt:0.5,flap:0.2,shortgpt:0.1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="reports/prune_time_ab")
    args = p.parse_args(argv)
    methods = [parse_method(m) for m in args.methods.split(",")]
    times: dict[str, dict[str, list[float]]] = {json.dumps(m): {t: [] for t in args.trees} for m in methods}
    for r in range(args.rounds):
        for m in methods:
            order = args.trees if r % 2 == 0 else args.trees[::-1]
            for tree in order:
                seconds = run_once(tree, m, args.nsamples, args.seqlen, args.threads)
                times[json.dumps(m)][tree].append(seconds)
                print(f"round {r} {m} {tree}: {seconds:.1f} s", flush=True)
    before, after = args.trees
    rows = [
        "| method | before median s (min-max) | after median s (min-max) | after / before |",
        "|---|---|---|---|",
    ]
    for key, per in times.items():
        a, b = per[before], per[after]
        rows.append(
            f"| {_label(json.loads(key))} | {statistics.median(a):.1f} "
            f"({min(a):.1f}-{max(a):.1f}) | {statistics.median(b):.1f} ({min(b):.1f}-{max(b):.1f}) | "
            f"{statistics.median(b) / statistics.median(a):.3f} |"
        )
    env = environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "seconds": times})
    head = (
        f"`python bench/prune_time_ab.py --trees {before} {after} --methods {args.methods} --rounds "
        f"{args.rounds} --nsamples {args.nsamples} --seqlen {args.seqlen}` on {env['cpu']}, commit "
        f"{env['commit']}, {env['time_utc']}\n\n"
    )
    write_text_atomic(out.with_suffix(".md"), head + "\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
