"""One process vs two (torch.distributed, Gloo) pruning SmolLM2: time, per-rank phases, and equality.

    python bench/distributed_prune.py --out reports/dist [--methods sparsegpt,wanda] [--sparsity 2:4]
    python bench/distributed_prune.py --out reports/dist-structured --methods flap@0.2,shortgpt@0.2

``METHOD@SPARSITY`` gives a method its own amount (structured methods: the share of block parameters).

For each method: ``sparsekit prune`` with 1 process and 1 thread, then ``torchrun
--nproc-per-node 2 -m sparsekit prune`` with 1 thread per process, same calibration (32 x 512
tokens of the offline corpus) and the same ``--batch-size``, each saving a plain checkpoint;
then the masks of the two models are compared layer by layer and both perplexities measured on
the same held-out tokens. The two runs are not interleaved (each needs the whole machine); run
it on a quiet machine and read the wall times with that in mind. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic


def _prune(out: Path, method: str, sparsity: str, procs: int, args) -> dict:
    cmd = ["-m", "sparsekit", "prune", args.model, "--method", method, "--sparsity", sparsity]
    cmd += [
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--batch-size",
        str(args.batch_size),
    ]
    from sparsekit.pruning.structured import is_structured

    # a structured prune saves the smaller dense model itself; the per-layer ones save it dense
    cmd += ([] if is_structured(method) else ["--save-format", "dense"]) + ["--out", str(out)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "prune_report.json").read_text())
    return {"wall_s": wall, "report": report, "command": " ".join(cmd[1:])}


def _compare(a: Path, b: Path, eval_ids) -> dict:
    from transformers import AutoModelForCausalLM

    from sparsekit.eval.perplexity import perplexity_of_ids
    from sparsekit.models import block_linears, find_decoder_blocks, linear_weight

    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (a, b)]
    blocks = [find_decoder_blocks(m)[1] for m in models]
    differ, total, max_weight_diff = 0, 0, 0.0
    for b1, b2 in zip(*blocks, strict=True):
        for l1, l2 in zip(block_linears(b1).values(), block_linears(b2).values(), strict=True):
            w1, w2 = linear_weight(l1).detach(), linear_weight(l2).detach()
            if w1.shape != w2.shape:  # a structured cut that differs: every entry counts
                differ, total = differ + max(w1.numel(), w2.numel()), total + max(w1.numel(), w2.numel())
                continue
            differ += int(((w1 != 0) != (w2 != 0)).sum())
            total += w1.numel()
            max_weight_diff = max(max_weight_diff, float((w1 - w2).abs().max()))
    ppl = [perplexity_of_ids(m, eval_ids, 512).ppl for m in models]
    return {
        "mask_entries_differing": differ,
        "mask_entries": total,
        "max_abs_weight_diff": max_weight_diff,
        "ppl_1proc": ppl[0],
        "ppl_2proc": ppl[1],
        "ppl_rel_diff": abs(ppl[1] - ppl[0]) / ppl[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/dist")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    from sparsekit.hf.data import DEFAULT_CORPUS, evaluation_ids
    from sparsekit.hf.models import load_model

    work = Path(args.out + "-models")
    work.mkdir(parents=True, exist_ok=True)
    _, tok = load_model(args.model)
    eval_ids = evaluation_ids(tok, DEFAULT_CORPUS, max_tokens=args.eval_tokens)
    rows = []
    for spec in args.methods.split(","):
        method, _, sparsity = spec.partition("@")
        sparsity = sparsity or args.sparsity
        runs = {}
        for procs in (1, 2):
            out = work / f"{method}-{procs}proc"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            runs[procs] = _prune(out, method, sparsity, procs, args)
        cmp = _compare(work / f"{method}-1proc", work / f"{method}-2proc", eval_ids)
        one, two = runs[1]["report"], runs[2]["report"]
        rows.append(
            {
                "method": method,
                "sparsity": sparsity,
                "wall_s": {"1proc": runs[1]["wall_s"], "2proc": runs[2]["wall_s"]},
                "prune_s": {"1proc": sum(one["timings_s"].values()), "2proc": sum(two["timings_s"].values())},
                "timings_1proc": one["timings_s"],
                # structured reports carry rank 0's phases only
                "rank_timings_2proc": two.get("rank_timings_s") or [two["timings_s"]],
                "commands": {k: v["command"] for k, v in runs.items()},
                **cmp,
            }
        )
        print(json.dumps(rows[-1], indent=1), flush=True)
    env = environment()
    write_json_atomic(Path(args.out).with_suffix(".json"), {"env": env, "args": vars(args), "rows": rows})
    lines = [
        f"# Pruning {args.model} on 1 process vs 2 (Gloo)",
        "",
        f"`python bench/distributed_prune.py {shlex.join(sys.argv[1:])}`; CPU {env['cpu']}, "
        "1 thread per process, "
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}; calibration {args.nsamples} x "
        f"{args.seqlen} tokens, batch {args.batch_size}; ppl on {eval_ids.shape[1]} held-out tokens.",
        "",
        "| method | sparsity | prune s, 1 proc | prune s, 2 procs (rank 0 / rank 1) | speedup "
        "| wall s 1 / 2 procs | forward s per rank | communication s per rank | masks differing "
        "| ppl 1 proc | ppl 2 procs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ranks = r["rank_timings_2proc"]
        per_rank = [sum(t.values()) for t in ranks]
        lines.append(
            f"| {r['method']} | {r['sparsity']} | {r['prune_s']['1proc']:.1f} | "
            + " / ".join(f"{v:.1f}" for v in per_rank)
            + f" | {r['prune_s']['1proc'] / max(per_rank):.2f}x | "
            f"{r['wall_s']['1proc']:.1f} / {r['wall_s']['2proc']:.1f} | "
            + " / ".join(f"{t.get('forward', 0):.1f}" for t in ranks)
            + " | "
            + " / ".join(f"{t.get('communication', 0):.2f}" for t in ranks)
            + f" | {r['mask_entries_differing']} of {r['mask_entries']:,} | {r['ppl_1proc']:.3f} | "
            f"{r['ppl_2proc']:.3f} |"
        )
    lines += [
        "",
        "prune s: the engine's phases (forward, statistics, solve, communication) summed; wall times "
        "(model load and save included) are in the JSON.",
    ]
    write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
