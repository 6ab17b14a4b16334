"""Perplexity of OWL allocation and the RIA score against uniform Wanda / SparseGPT, SmolLM2-135M.

    python bench/owl_ria_table.py --out reports/owl_ria
    # the issue-28 protocol, three rows: 64 x 512 calibration tokens, ppl on 32,768 held-out tokens
    python bench/owl_ria_table.py --nsamples 64 --eval-tokens 32768 \
        --rows 0.7/wanda/uniform 0.7/wanda/owl 0.7/sparsegpt/owl --out reports/owl_issue28

Same calibration (32 x 512 tokens of the offline corpus, seed 0) and evaluation (8,192 held-out
tokens, windows of 512) for every row, each pruned from a fresh copy of the dense model; prune
time beside each (the OWL rows include its extra dense pass over the blocks): the score x
allocation grid. The whole composition (refine, update, permutation) is bench/beyond_sparsegpt.py.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import sys
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
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="SPARSITY/METHOD/ALLOCATION",
        help="run only these rows (e.g. 0.7/wanda/owl; 'dense' for the dense row); default: the whole grid",
    )
    parser.add_argument(
        "--forward-dtype", default="auto", help="calibration forwards: auto (bf16 where fast) | float32"
    )
    args = parser.parse_args()
    grid = _selected_rows(args.rows)
    dense, tok = load_model("smollm2")
    calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=0)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    rows = []
    if args.rows is None or "dense" in args.rows:
        rows.append(
            {
                "sparsity": "dense",
                "method": "dense",
                "allocation": "-",
                "ppl": perplexity_of_ids(dense, eval_ids, 512).ppl,
            }
        )
    for sparsity, method, alloc in grid:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = sparsekit.prune(
            model,
            method=method,
            sparsity=sparsity,
            calib=calib,
            allocation=alloc,
            forward_dtype=args.forward_dtype,
            show_progress=False,
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
                "forward_dtype": report.forward_dtype,
                "timings_s": report.timings_s,
                "block_sparsities": report.block_sparsities,
                "block_sparsities_reached": _reached(report) if report.block_sparsities else [],
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
        f"`python bench/owl_ria_table.py {shlex.join(sys.argv[1:])}`; CPU {env['cpu']}, "
        f"{env['cpu_threads']} threads, "
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}; calibration {args.nsamples} x "
        f"{args.seqlen}, ppl on {eval_ids.shape[1]} held-out tokens."
    )
    allocated = [
        f"- {r['method']} + {r['allocation']} {r['sparsity']}: block sparsities reached "
        + " ".join(f"{s:.3f}" for s in r["block_sparsities_reached"])
        for r in rows
        if r.get("block_sparsities")
    ]
    text = "\n".join([header, "", *lines, *([""] + allocated if allocated else [])]) + "\n"
    write_text_atomic(out.with_suffix(".md"), text)
    print(text)


def _reached(report) -> list[float]:
    """Per decoder block, the share of its pruned layers' weights that are zero (as pruned)."""
    zeros: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for layer in report.layers:
        block = re.match(r"(.*?\.\d+)\.", layer.name).group(1)  # model.layers.<i>
        size = layer.shape[0] * layer.shape[1]
        zeros[block] = zeros.get(block, 0.0) + layer.sparsity * size
        sizes[block] = sizes.get(block, 0) + size
    return [zeros[b] / sizes[b] for b in sizes]


def _selected_rows(wanted: list[str] | None) -> list[tuple[str, str, str]]:
    """The grid's rows, or only those named as 'sparsity/method/allocation'."""
    if wanted is None:
        return ROWS
    known = {"/".join(r): r for r in ROWS}
    unknown = [w for w in wanted if w != "dense" and w not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from dense, {', '.join(known)}")
    return [known[w] for w in wanted if w != "dense"]


if __name__ == "__main__":
    main()
