"""How far two exact implementations of SparseGPT's solve drift apart on SmolLM2 at 2:4.

    python bench/sparsegpt_solver_spread.py --out docs/data/sparsegpt_solver_spread

The factor solver (default: from H's own Cholesky factor) and the plain one (the paper's loop on
chol(H^-1), per column) are the same algorithm in exact arithmetic (tests/pruning compare them
layer by layer); in fp32 their rounding differs, N:M's forced choices flip, and perplexity
follows. Issue-28 protocol: fp32 forwards, 64 x 512 calibration tokens (seed 0), 32,768 held-out
tokens in windows of 512, 2 threads. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import sparsekit
from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.pruning.sparsegpt import FACTOR_SOLVER, PLAIN_SOLVER, SparseGPT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/sparsegpt_solver_spread")
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--forward-dtype", default="float32")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    dense, tok = load_model("smollm2", dtype=torch.float32)
    calib = calibration_ids(tok, "wiki-offline", 64, 512, seed=0)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=32768)
    env = environment()
    rows = []
    for name, solver in (("factor", FACTOR_SOLVER), ("plain", PLAIN_SOLVER)):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        sparsekit.prune(
            model, method=SparseGPT(solver), sparsity=args.sparsity, calib=calib,
            forward_dtype=args.forward_dtype, show_progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        rows.append({"solver": name, "ppl": perplexity_of_ids(model, eval_ids, 512).ppl, "prune_s": seconds})
        print(rows[-1], flush=True)
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "rows": rows})
    lines = [
        f"`python bench/sparsegpt_solver_spread.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
        f"{env['cpu']} ({env['cpu_threads']} threads), torch {env['torch']}, commit {env['commit']}, "
        f"{env['time_utc']}; SparseGPT {args.sparsity}, {args.forward_dtype} forwards.",
        "",
        "| solver | ppl | prune s |",
        "|---|---:|---:|",
        *(f"| {r['solver']} | {r['ppl']:.3f} | {r['prune_s']:.1f} |" for r in rows),
    ]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
