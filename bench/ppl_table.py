"""Perplexity of dense / magnitude / Wanda / SparseGPT at 50%, 4:8 and 2:4 on the real default model.

    python bench/ppl_table.py --out reports/ppl            # SmolLM2-135M + offline Wikipedia corpus

Writes ppl_table.json and ppl_table.md (with the environment) to --out.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

from sparsekit._env import environment
from sparsekit._io import write_json_atomic
from sparsekit.bench.quality import quality_markdown, quality_table
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calib", default="wiki-offline")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="0.5,4:8,2:4")
    parser.add_argument("--forward-dtype", default="auto", help="auto, model, bf16, ...")
    parser.add_argument("--out", default="reports/ppl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model, tokenizer = load_model(args.model)
    calib = calibration_ids(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    eval_ids = evaluation_ids(tokenizer, args.calib, max_tokens=args.eval_tokens)
    rows = quality_table(
        model,
        calib,
        eval_ids,
        tuple(args.methods.split(",")),
        tuple(args.patterns.split(",")),
        args.eval_seqlen,
        forward_dtype=args.forward_dtype,
    )
    env = environment()
    setup = (
        f"model {args.model}, calibration {args.calib} {args.nsamples} x {args.seqlen} tokens (seed 0), "
        f"evaluation: held-out split, {eval_ids.shape[1]} tokens in windows of {args.eval_seqlen}; "
        f"calibration forwards: {args.forward_dtype}"
    )
    out = Path(args.out)
    write_json_atomic(out / "ppl_table.json", {"env": env, "setup": setup, "rows": [asdict(r) for r in rows]})
    markdown = (
        f"{quality_markdown(rows)}\n\n{setup}. Machine: {env['cpu']} ({env['cpu_threads']} threads), "
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}.\n"
    )
    (out / "ppl_table.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
