"""Whole-model prune time per phase: sparsekit's engine against the reference codes' way of working.

    python bench/prune_speed.py --out reports/prune_speed

"reference-style" reproduces how the SparseGPT/Wanda reference scripts run: one forward per
calibration sample, a separate statistic (Hessian / norm) for every linear layer, and the plain
per-column SparseGPT solver, forwards in the model's dtype (fp32 here). "sparsekit" is the default
engine: batched block forwards in bf16 where the CPU has native bf16 matmuls (as the papers ran
fp16 forwards on GPUs; statistics stay fp32, weights are pruned in fp32), one statistic per
distinct input (q/k/v and gate/up share), the two-level blocked solver. Same calibration tokens,
same evaluation tokens, one run, side by side.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

from sparsekit._env import environment
from sparsekit._io import write_json_atomic
from sparsekit.api import prune
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.pruning import FACTOR_SOLVER, PLAIN_SOLVER, SparseGPT, pruning_method

STYLES = {  # style -> (PruneConfig options, SparseGPT solver)
    "reference-style": (
        dict(batch_size=1, share_statistics=False, measure_error=False, forward_dtype="model"),
        PLAIN_SOLVER,
    ),
    "sparsekit": ({}, FACTOR_SOLVER),
}


def _method(name: str, solver):
    """The method object: SparseGPT with the style's solver, the others by name."""
    return SparseGPT(solver) if name == "sparsegpt" else pruning_method(name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default="reports/prune_speed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model, tokenizer = load_model(args.model)
    calib = calibration_ids(tokenizer, "wiki-offline", args.nsamples, args.seqlen, seed=0)
    eval_ids = evaluation_ids(tokenizer, "wiki-offline", max_tokens=args.eval_tokens)
    rows = []
    for method in args.methods.split(","):
        for style, (options, solver) in STYLES.items():
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            report = prune(
                pruned, method=_method(method, solver), sparsity=args.sparsity, calib=calib, **options
            )
            total = time.perf_counter() - start
            ppl = perplexity_of_ids(pruned, eval_ids, 512).ppl
            rows.append(
                dict(
                    method=method,
                    style=style,
                    total_s=total,
                    ppl=ppl,
                    forward_dtype=report.forward_dtype,
                    **report.timings_s,
                )
            )
            logging.info("%s %s: %.1f s, ppl %.3f", method, style, total, ppl)
    env = environment()
    lines = [
        "| method | engine | forwards in | total s | forward s | statistics s | solve s | ppl | speedup |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = next(r for r in rows if r["method"] == row["method"] and r["style"] == "reference-style")
        lines.append(
            f"| {row['method']} | {row['style']} | {row['forward_dtype']} | {row['total_s']:.1f} | "
            f"{row.get('forward', 0):.1f} | "
            f"{row.get('statistics', 0):.1f} | {row.get('solve', 0):.1f} | {row['ppl']:.3f} | "
            f"{base['total_s'] / row['total_s']:.2f}x |"
        )
    setup = (
        f"{args.model}, {args.sparsity}, calibration wiki-offline {args.nsamples} x {args.seqlen} tokens, "
        f"ppl on {eval_ids.shape[1]} held-out tokens (windows of 512). {env['cpu']} "
        f"({env['cpu_threads']} threads), torch {env['torch']}, commit {env['commit']}, {env['time_utc']}"
    )
    markdown = "\n".join(lines) + f"\n\n{setup}\n"
    out = Path(args.out)
    write_json_atomic(out / "prune_speed.json", {"env": env, "setup": setup, "rows": rows})
    (out / "prune_speed.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
