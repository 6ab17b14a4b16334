"""Perplexity of OWL allocation and the RIA score against uniform Wanda / SparseGPT, SmolLM2-135M.

    python bench/owl_ria_table.py --out reports/owl_ria

Same calibration (32 x 512 tokens of the offline corpus, seed 0) and evaluation (8,192 held-out
tokens, windows of 512) for every row, each pruned from a fresh copy of the dense model; prune
time beside each (the OWL rows include its extra dense pass over the blocks): the score x
allocation grid. The whole composition (refine, update, permutation) is bench/beyond_sparsegpt.py.
Writes <out>.json and <out>.md.
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

ROWS = [
    ("0.7", "wanda", "uniform"),
    ("0.7", "wanda", "owl"),
    ("0.7", "ria", "uniform"),
    ("0.7", "ria", "owl"),
    ("0.7", "sparsegpt", "uniform"),
    ("0.7", "sparsegpt", "owl"),
    ("0.5", "wanda", "uniform"),
    ("0.5", "ria", "uniform"),
    ("0.5", "sparsegpt", "uniform"),
    ("2:4", "wanda", "uniform"),
    ("2:4", "ria", "uniform"),
    ("2:4", "sparsegpt", "uniform"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/owl_ria")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    dense, tok = load_model("smollm2")
    calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=0)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    rows = [
        {
            "sparsity": "dense",
            "method": "dense",
            "allocation": "-",
            "ppl": perplexity_of_ids(dense, eval_ids, 512).ppl,
        }
    ]
    for sparsity, method, alloc in ROWS:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = sparsekit.prune(
            model, method=method, sparsity=sparsity, calib=calib, allocation=alloc, show_progress=False
        )
        seconds = time.perf_counter() - start
        ppl = perplexity_of_ids(model, eval_ids, 512).ppl
        rows.append(
            {
                "sparsity": sparsity,
                "method": method,
                "allocation": alloc,
                "ppl": ppl,
                "prune_s": seconds,
                "overall_sparsity": report.overall_sparsity,
                "block_sparsities": report.block_sparsities,
            }
        )
        print(rows[-1] | {"block_sparsities": len(report.block_sparsities)}, flush=True)
        del model
    env = environment()
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"env": env, "args": vars(args), "rows": rows})
    lines = [
        "| sparsity | method | allocation | ppl | prune s | overall sparsity |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sparsity']} | {r['method']} | {r['allocation']} | {r['ppl']:.2f} | "
            f"{r.get('prune_s', 0):.1f} | {r.get('overall_sparsity', 0):.3f} |"
        )
    header = (
        f"`python bench/owl_ria_table.py --out {args.out}`; CPU {env['cpu']}, {env['cpu_threads']} threads, "
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}; calibration {args.nsamples} x "
        f"{args.seqlen}, ppl on {eval_ids.shape[1]} held-out tokens."
    )
    write_text_atomic(out.with_suffix(".md"), header + "\n\n" + "\n".join(lines) + "\n")
    print(header + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
