"""How far rounding-level changes move one prune's perplexity on SmolLM2, per calibration draw.

    python bench/rounding_spread.py --method sparsegpt --sparsity 2:4 --seeds 0 3 4 \\
        --variants float32@4 float32@8 float32@16 auto@8 --out docs/data/rounding_spread_sparsegpt24

A variant is ``FORWARD_DTYPE@BATCH``: the calibration forwards' dtype (``float32``, or ``auto``:
bf16 where the CPU has fast bf16 matmuls) and how many calibration sequences each block forward
takes. Batch sizes change only the order of the same fp32 sums (GEMM blocking, the statistics'
chunk sums), so their spread is how much of a gap between two equivalent implementations is
rounding; the forward dtype is the default's one departure from fp32. Issue-28 protocol:
SmolLM2-135M fp32, 64 x 512 calibration tokens of the offline corpus per seed, ppl on 32,768
held-out tokens in windows of 512, 2 threads. Writes <out>.json and <out>.md after every prune: per
seed each variant's ppl and prune time, and per variant its ppl over the first variant's on the
same seed (median and range over seeds).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

import sparsekit
from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.formats import parse_sparsity
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.pruning.method import pruning_method

DTYPES = ("float32", "auto")
log = logging.getLogger("rounding_spread")


def parse_variant(text: str) -> tuple[str, int]:
    """'float32@8' -> ('float32', 8); raises ValueError naming the accepted form."""
    dtype, sep, batch = text.partition("@")
    if dtype not in DTYPES or not sep or not batch.isdigit() or int(batch) < 1:
        raise ValueError(
            f"variant {text!r}: write FORWARD_DTYPE@BATCH, FORWARD_DTYPE one of {DTYPES}, BATCH >= 1"
        )
    return dtype, int(batch)


def spread(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per variant: median ppl and prune s over seeds, and its ppl over the first variant's on the
    same seed (median, min, max over the seeds both ran)."""
    base = {r["seed"]: r["ppl"] for r in rows if r["variant"] == variants[0]}
    out = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        ratios = [r["ppl"] / base[r["seed"]] for r in mine if r["seed"] in base]
        out.append(
            {
                "variant": variant,
                "seeds": [r["seed"] for r in mine],
                "ppl": statistics.median(r["ppl"] for r in mine),
                "prune_s": statistics.median(r["prune_s"] for r in mine),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    return out


def markdown(head: str, rows: list[dict], variants: list[str]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    cell = {(r["seed"], r["variant"]): r for r in rows}
    lines = [
        head,
        "",
        "ppl (prune s) per calibration draw:",
        "",
        "| seed | " + " | ".join(variants) + " |",
        "|---:|" + "---:|" * len(variants),
    ]
    for seed in seeds:
        got = [cell.get((seed, v)) for v in variants]
        lines.append(
            f"| {seed} | "
            + " | ".join(f"{r['ppl']:.2f} ({r['prune_s']:.0f})" if r else "-" for r in got)
            + " |"
        )
    lines += [
        "",
        f"Per variant, over seeds: median ppl, and its ppl over {variants[0]}'s on the same seed "
        "(median, range):",
        "",
        "| variant | seeds | median ppl | median prune s | ratio | range |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in spread(rows, variants):
        lines.append(
            f"| {s['variant']} | {len(s['seeds'])} | {s['ppl']:.2f} | {s['prune_s']:.1f} | "
            f"{s['ratio']:.3f} | {s['ratio_min']:.3f}-{s['ratio_max']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/rounding_spread")
    p.add_argument(
        "--method", default="sparsegpt", help="a sparsekit method name (sparsekit.prune's method=)"
    )
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=["float32@8", "float32@4", "float32@16", "auto@8"])
    p.add_argument("--model", default="smollm2", help="a model sparsekit.hf.models.load_model knows")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    args = p.parse_args(argv)
    try:
        parsed = [parse_variant(v) for v in args.variants]
        pruning_method(args.method)
        parse_sparsity(args.sparsity)
    except ValueError as exc:
        p.error(str(exc))
    for name, values in (("--seeds", args.seeds), ("--variants", args.variants)):
        if len(set(values)) != len(values):
            p.error(f"{name} repeats a value: {values}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    env = environment()  # the commit and time the run starts at
    dense, tok = load_model(args.model, dtype=torch.float32)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    head = (
        f"{run_line('bench/rounding_spread.py', argv, env)}; {args.model} fp32, {args.method} "
        f"{args.sparsity}, calibration {args.nsamples} x {args.seqlen} per seed, ppl on {eval_ids.shape[1]} "
        "held-out tokens in windows of 512."
    )
    out, rows = Path(args.out), []
    for seed in args.seeds:
        calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=seed)
        for variant, (dtype, batch) in zip(args.variants, parsed, strict=True):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = sparsekit.prune(
                model, method=args.method, sparsity=args.sparsity, calib=calib, forward_dtype=dtype,
                batch_size=batch, show_progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            row = {"seed": seed, "variant": variant, "forward_dtype": report.forward_dtype, "batch": batch,
                   "ppl": perplexity_of_ids(model, eval_ids, 512).ppl, "prune_s": seconds,
                   "timings_s": report.timings_s}  # fmt: skip
            rows.append(row)
            log.info("%s", row)
            doc = {
                "environment": env,
                "args": vars(args),
                "rows": rows,
                "spread": spread(rows, args.variants),
            }
            write_json_atomic(out.with_suffix(".json"), doc)
            write_text_atomic(out.with_suffix(".md"), markdown(head, rows, args.variants))
            del model
    print(markdown(head, rows, args.variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
