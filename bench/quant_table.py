"""Quantization beside pruning on SmolLM2: quality, size and decode speed in one table and chart.

    python bench/quant_table.py --out docs/data/quant_table          # bf16, about 30 min on 2 cores

Rows, each from a fresh copy of the same dense model with the same calibration tokens (32 x 512 of
the offline corpus, seed 0), measured the same way (``sparsekit.bench.compare``): dense; int8 and
int4 weight-only (torch's CPU ops); SparseGPT 2:4 alone and + int8 (sparsekit's 2:4-int8 kernel);
int8 and SparseGPT 2:4 + int8 again with the lm_head quantized too ("(head too)");
FLAP 20% alone, + int8 and + int4; Wanda 50% + int8 (unstructured zeros kept inside an int8 weight,
no bytes saved: the control). Quantization is applied after pruning and before any evaluation, so
ppl and accuracy include its error. Columns: perplexity on 8,192 held-out tokens, ``wiki_lambada``
/ ``wiki_continuation`` accuracy, parameters (all and non-zero), bytes in memory, prune time, and
TTFT (512-token prompt) / TPOT (16 new tokens) with every row's generations interleaved in
``--rounds`` rounds. ``--rows`` picks rows by name substring; ``--quick`` is a smoke run. Writes
<out>.json, <out>.md and <out>.png (the Pareto chart).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from sparsekit._env import environment
from sparsekit.bench.compare import (
    DENSE,
    Variant,
    compare_markdown,
    compare_variants,
    plot_pareto,
    quantized,
    table_writers,
    unstructured,
    width,
)
from sparsekit.bench.e2e import prompt_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.kernels.dtypes import parse_dtype


def variants() -> list[Variant]:
    sgpt, flap = unstructured("sparsegpt", "2:4"), width("flap", 0.2)
    return [
        DENSE,
        quantized(DENSE, "int8"),
        quantized(DENSE, "int8", head=True),
        quantized(DENSE, "int4"),
        sgpt,
        quantized(sgpt, "int8"),
        quantized(sgpt, "int8", head=True),
        flap,
        quantized(flap, "int8"),
        quantized(flap, "int4"),
        quantized(unstructured("wanda", "0.5"), "int8"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="reports/quant_table")
    p.add_argument("--dtype", default="bf16", help="model dtype: bf16 (torch's int8/int4 CPU ops) or fp32")
    p.add_argument("--rows", default="", help="comma-separated substrings of row names (dense always)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--items", type=int, default=None, help="items per zero-shot task (default 150; quick 8)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 8192; quick 1024)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5; quick 2)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    nsamples, seqlen, eval_tokens, items, rounds, prompt_len = (
        (4, 128, 1024, 8, 2, 64) if args.quick else (32, 512, 8192, 150, 5, 512)
    )
    eval_tokens, items, rounds = args.eval_tokens or eval_tokens, args.items or items, args.rounds or rounds
    chosen = variants()
    if args.rows:
        wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
        chosen = [v for v in chosen if v is DENSE or any(w in v.name for w in wanted)]
    model, tok = load_model(args.model, dtype=dtype)
    calib = calibration_ids(tok, "wiki-offline", nsamples, seqlen, 0)
    eval_ids = evaluation_ids(tok, "wiki-offline", eval_tokens)
    prompt, _ = prompt_ids(tok, 1, prompt_len, corpus="wiki-offline")
    env = environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python bench/quant_table.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    head = (
        f"`{command}` on {env['cpu']} ({args.threads} threads), {args.dtype}, torch {env['torch']}, "
        f"transformers {env['transformers']}, commit {env['commit']}, {env['time_utc']}; calibration "
        f"{nsamples} x {seqlen}, {eval_tokens} eval tokens (windows of 512), {items} items per task, "
        f"TTFT on a {prompt_len}-token prompt, TPOT over 16 new tokens, {rounds} interleaved rounds.\n\n"
    )

    write, partial = table_writers(
        out, head, {"command": command, "environment": env, "args": vars(args)}, len(chosen)
    )

    rows = compare_variants(
        model,
        tok,
        chosen,
        calib,
        eval_ids,
        limits={"wiki_lambada": items, "wiki_continuation": items},
        prompt_ids=prompt,
        new_tokens=16,
        rounds=rounds,
        on_row=partial,
    )
    write(rows)
    plot_pareto(rows, out.with_suffix(".png"), title=f"SmolLM2-135M, {args.dtype}, {env['cpu']}")
    print(head + compare_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
