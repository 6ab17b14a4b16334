"""Expert removal and pruning inside experts on one real-weight MoE, in one table.

    python bench/make_moe.py --out reports/moe-smollm2          # the MoE (SmolLM2 MoEfied into Mixtral)
    python bench/moe_table.py --model reports/moe-smollm2 --out reports/moe_table

Rows, each pruned from a fresh copy with the same calibration tokens (32 x 512 of the offline
corpus, seed 0) and measured the same way (``sparsekit.bench.compare``): dense; REAP, EAN,
frequency and random expert removal at 25% and 50% of the experts; Wanda, SparseGPT and
SparseGPT+ADMM inside the experts at 50% and 2:4 with routed statistics and with every token
through every expert (``expert_tokens="all"``, what a routing-blind port does); REAP 25% then
Wanda 50% (STUN). Columns: perplexity on 8,192 held-out tokens, ``wiki_lambada`` /
``wiki_continuation`` accuracy, parameters (all and non-zero), bytes in memory and as saved by
``sparsekit.save`` (fused experts compressed on disk, dense in memory), prune time, and decode TPOT /
prefill TTFT with every row's generations interleaved. ``--rows`` picks rows by name substring;
``--quick`` is a smoke run (8 x 256 calibration, 2,048 eval tokens, 40 items per task, 2 rounds).
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from sparsekit._env import environment
from sparsekit.bench.compare import DENSE, Variant, _step, compare_markdown, compare_variants, table_writers
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model


def _experts(method: str, fraction: float) -> Variant:
    return Variant(
        f"{method} {round(100 * fraction)}% of experts", "experts", (_step(method, str(fraction)),)
    )


def _inside(method: str, sparsity: str, tokens: str, **steps: object) -> Variant:
    label = sparsity if ":" in sparsity else f"{round(100 * float(sparsity))}%"
    recipe = "+".join([method, *(str(v) for v in steps.values())])
    name = f"{recipe} {label} inside experts ({tokens} tokens)"
    return Variant(
        name,
        "N:M" if ":" in sparsity else "unstructured",
        (_step(method, sparsity, expert_tokens=tokens, **steps),),
        sparsify=True,
    )


def variants() -> list[Variant]:
    rows = [DENSE]
    for fraction in (0.25, 0.5):
        rows += [_experts(m, fraction) for m in ("reap", "ean", "frequency", "random-experts")]
    for sparsity in ("0.5", "2:4"):
        for tokens in ("routed", "all"):
            rows += [
                _inside("wanda", sparsity, tokens),
                _inside("sparsegpt", sparsity, tokens),
                _inside("sparsegpt", sparsity, tokens, update="admm"),
            ]
    rows.append(
        Variant(
            "reap 25% + wanda 50% (STUN)",
            "experts+unstructured",
            (_step("reap", "0.25"), _step("wanda", "0.5")),
            sparsify=True,
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="reports/moe-smollm2", help="the MoE checkpoint folder (bench/make_moe.py)"
    )
    p.add_argument("--out", default="reports/moe_table")
    p.add_argument(
        "--rows", default="", help="comma-separated substrings of the row names to run (dense always)"
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--items", type=int, default=None, help="items per zero-shot task (default 200; quick 40)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 32; quick 8)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 8192; quick 2048)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3; quick 2)")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        p.error(
            f"{args.model} is not a checkpoint folder: build it with "
            f"python bench/make_moe.py --out {args.model}"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    nsamples, seqlen, eval_tokens, items, rounds = (
        (8, 256, 2048, 40, 2) if args.quick else (32, 512, 8192, 200, 3)
    )
    nsamples, eval_tokens = args.nsamples or nsamples, args.eval_tokens or eval_tokens
    items, rounds = args.items or items, args.rounds or rounds
    model, tok = load_model(args.model, dtype=torch.float32)
    calib = calibration_ids(tok, "wiki-offline", nsamples, seqlen, 0)
    eval_ids = evaluation_ids(tok, "wiki-offline", eval_tokens)
    chosen = variants()
    if args.rows:
        wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
        chosen = [v for v in chosen if v is DENSE or any(w in v.name for w in wanted)]
    prompt = eval_ids[:, :64]
    env = environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = (
        f"`python bench/moe_table.py {' '.join(sys.argv[1:] if argv is None else argv)}` on {env['cpu']} "
        f"({env['cpu_threads']} threads), torch {env['torch']}, transformers {env['transformers']}, commit "
        f"{env['commit']}, {env['time_utc']}; calibration {nsamples} x {seqlen}, {eval_tokens} eval tokens, "
        f"{items} items per task, {rounds} timing rounds.\n\n"
    )

    write, partial = table_writers(out, head, {"environment": env, "args": vars(args)}, len(chosen))

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
        checkpoint_bytes=True,
        on_row=partial,
    )
    write(rows)
    print(head + compare_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
