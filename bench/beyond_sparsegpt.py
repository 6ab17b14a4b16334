"""Perplexity and prune time of every issue-15 piece and their combinations, SmolLM2-135M.

    python bench/beyond_sparsegpt.py --out reports/beyond_sparsegpt

One calibration (32 x 512 tokens of the offline corpus, seed 0) and one evaluation (8,192 held-out
tokens, windows of 512) for every row, each pruned from a fresh copy of the dense model, at 50%,
2:4, 4:8 and 70%: the current Wanda and SparseGPT; each new piece alone (the RIA score, DSnoT
refinement, the ADMM update, RIA's channel permutation, OWL allocation); combinations. Rows run
in the order below, no row is chosen after looking at the evaluation text. Writes <out>.json
and <out>.md (``--only 2:4`` runs one sparsity; ``--quick`` 8 x 256 calibration, for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import sparsekit
from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model

# (method, steps) per sparsity; steps are PruneConfig keywords
BASE = [("wanda", {}), ("sparsegpt", {})]
ALONE = [
    ("ria", {}),
    ("wanda", {"refine": "dsnot"}),
    ("sparsegpt", {"update": "admm"}),
    ("wanda", {"update": "admm"}),
]
COMBOS = [
    ("sparsegpt", {"refine": "dsnot", "update": "sparsegpt"}),
    ("sparsegpt", {"refine": "dsnot", "update": "admm"}),
    ("ria", {"refine": "dsnot", "update": "admm"}),
]
NM_ONLY = [
    ("ria", {"permute": True}),
    ("wanda", {"permute": True}),
    ("sparsegpt", {"permute": True}),
    ("ria", {"permute": True, "update": "admm"}),
    ("sparsegpt", {"permute": True, "update": "admm"}),
    ("ria", {"permute": True, "refine": "dsnot", "update": "admm"}),
]
UNSTRUCTURED_HIGH = [
    ("wanda", {"allocation": "owl"}),
    ("sparsegpt", {"allocation": "owl"}),
    ("sparsegpt", {"allocation": "owl", "update": "admm"}),
]
FORWARD_DTYPE = [
    ("sparsegpt", {"forward_dtype": "fp32"}),
    ("sparsegpt", {"forward_dtype": "fp32", "update": "admm"}),
]
PLAN = {
    "0.5": BASE + ALONE + COMBOS,
    "2:4": BASE + ALONE + NM_ONLY + COMBOS + FORWARD_DTYPE,
    "4:8": BASE + ALONE + NM_ONLY[:1] + NM_ONLY[3:] + COMBOS[1:],
    "0.7": BASE + ALONE + UNSTRUCTURED_HIGH + COMBOS[1:],
}


def _label(method: str, steps: dict) -> str:
    parts = [method] + [k if v is True else str(v) for k, v in steps.items() if k != "forward_dtype"]
    if "forward_dtype" in steps:
        parts.append(f"{steps['forward_dtype']} forwards")
    return "+".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/beyond_sparsegpt")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--only", choices=tuple(PLAN), default=None, help="run one sparsity")
    parser.add_argument("--quick", action="store_true", help="8 x 256 calibration, 2048 eval tokens (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.nsamples, args.seqlen, args.eval_tokens = 8, 256, 2048
    dense, tok = load_model("smollm2")
    calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=0)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    rows = [{"sparsity": "dense", "recipe": "dense", "ppl": perplexity_of_ids(dense, eval_ids, 512).ppl}]
    print(rows[0], flush=True)
    for sparsity, plan in PLAN.items():
        if args.only and sparsity != args.only:
            continue
        for method, steps in plan:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = sparsekit.prune(
                model, method=method, sparsity=sparsity, calib=calib, show_progress=False, **steps
            )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "sparsity": sparsity,
                    "recipe": _label(method, steps),
                    "ppl": perplexity_of_ids(model, eval_ids, 512).ppl,
                    "prune_s": seconds,
                    "phases_s": report.timings_s,
                    "overall_sparsity": report.overall_sparsity,
                    "forward_dtype": report.forward_dtype,
                    "block_rel_error_sum": sum(report.block_rel_errors),
                }
            )
            print({k: v for k, v in rows[-1].items() if k != "phases_s"}, flush=True)
            del model
    env = environment()
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"env": env, "args": vars(args), "rows": rows})
    write_text_atomic(out.with_suffix(".md"), _markdown(rows, args, env, eval_ids.shape[1]))
    print(_markdown(rows, args, env, eval_ids.shape[1]))


def _markdown(rows: list[dict], args, env: dict, eval_tokens: int) -> str:
    lines = [
        "| sparsity | recipe | ppl | vs SparseGPT | prune s | sum of block errors |",
        "|---|---|---:|---:|---:|---:|",
    ]
    reference = {r["sparsity"]: r["ppl"] for r in rows if r["recipe"] == "sparsegpt"}
    for r in rows:
        ref = reference.get(r["sparsity"])
        change = f"{100 * (r['ppl'] / ref - 1):+.1f}%" if ref and r["recipe"] != "dense" else ""
        lines.append(
            f"| {r['sparsity']} | {r['recipe']} | {r['ppl']:.2f} | {change} | {r.get('prune_s', 0):.1f} | "
            f"{r.get('block_rel_error_sum', 0):.3f} |"
        )
    header = (
        f"`python bench/beyond_sparsegpt.py --out {args.out}"
        f"{' --only ' + args.only if args.only else ''}{' --quick' if args.quick else ''}`; "
        f"CPU {env['cpu']}, {env['cpu_threads']} threads, torch {env['torch']}, commit {env['commit']}, "
        f"{env['time_utc']}; calibration {args.nsamples} x {args.seqlen} (wiki-offline, seed 0), ppl on "
        f"{eval_tokens} held-out tokens; calibration forwards in bf16 (the default) unless the row says fp32."
    )
    return header + "\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
