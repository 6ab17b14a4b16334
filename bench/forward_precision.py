"""How far calibration forwards at each precision land from fp32's, block by block, on SmolLM2.

    python bench/forward_precision.py --out docs/data/forward-precision-epyc

Runs the dense model's decoder blocks on the same calibration chunks at every precision of
``--precisions`` (``forward_dtype`` values: ``bfloat16`` casts a copy of each block and every
input; ``bf16-mixed`` runs the block itself under autocast, hidden states fp32) and at fp32, and
reports per block (a) the relative Frobenius error of the block's output hidden states against
fp32's, (b) the relative error of the Gram matrices X^T X the statistics hooks collect (SparseGPT's
Hessian, Wanda's norms are its diagonal) for the attention input (q/k/v, fed by a norm) and the MLP
output projection (down, fed by a product), and (c) the forward time per precision, the
precisions interleaved in ``--rounds`` rounds (median and p20..p80; the block forwards with the
two Gram hooks on, as a SparseGPT pass runs them, capture excluded). No pruning: every precision
sees the dense model, so the errors are the forwards' own. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.hf.data import calibration_ids
from sparsekit.hf.models import load_model
from sparsekit.models import describe, model_dtype
from sparsekit.pruning.capture import (
    Chunk,
    capture_block_inputs,
    cast_runner,
    check_forward_dtype,
    resolve_forward_precision,
    run_block,
)
from sparsekit.pruning.hooks import StatsCollector, Timer
from sparsekit.pruning.method import Gram

log = logging.getLogger("forward_precision")
CPU = torch.device("cpu")


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64."""
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm()).item()


def block_pass(anatomy, chunks: list[Chunk], index: int, layers: dict[str, str]) -> tuple[list, dict, float]:
    """Block ``index`` on every chunk: (outputs, {label: Gram [K, K] fp32}, seconds of the forwards)."""
    block = anatomy[index].module
    runner = cast_runner(block, chunks[0].hidden.dtype)
    linears = {label: runner.get_submodule(path) for label, path in layers.items()}
    collector = StatsCollector(linears, Gram(), Timer(CPU), share=False)
    start = time.perf_counter()
    outputs = run_block(runner, chunks, index, collector.next_chunk)
    seconds = time.perf_counter() - start
    collector.remove()
    grams = {label: stat.value for label, stat in collector.finish().items()}
    return outputs, grams, seconds


def measure(model, ids: torch.Tensor, precisions: list[str], batch: int, rounds: int) -> dict:
    """Per precision: per-block errors against fp32, and forward seconds per round."""
    anatomy = describe(model)
    first = anatomy[0]
    layers = {"qkv": first.attention.q, "down": first.mlp.down}  # paths inside a block
    names = ["float32", *precisions]
    results = {n: {"hidden": [], "gram_qkv": [], "gram_down": [], "seconds": []} for n in names}
    for round_ in range(rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        per: dict[str, list] = {}
        for name in order:
            chunks = capture_block_inputs(model, anatomy.blocks, ids, batch, CPU)
            resolve_forward_precision(check_forward_dtype(name), model_dtype(model), CPU).apply(chunks)
            total, per[name] = 0.0, []
            for index in range(len(anatomy.blocks)):
                outputs, grams, seconds = block_pass(anatomy, chunks, index, layers)
                total += seconds
                if round_ == 0:  # the errors do not change between rounds: only the times are repeated
                    per[name].append((torch.cat([o.float() for o in outputs]), grams))
                for chunk, out in zip(chunks, outputs, strict=True):
                    chunk.hidden = out
            results[name]["seconds"].append(total)
            log.info("round %d %s: %.1f s", round_, name, total)
        if round_ == 0:
            for name in names:
                for (hidden, grams), (ref_hidden, ref_grams) in zip(per[name], per["float32"], strict=True):
                    results[name]["hidden"].append(rel(hidden, ref_hidden))
                    for label in layers:
                        results[name][f"gram_{label}"].append(rel(grams[label], ref_grams[label]))
        del per
    return results


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80), inclusive."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=5, method="inclusive")
    return statistics.median(values), q[0], q[3]


def markdown(head: str, results: dict, blocks: list[int]) -> str:
    names = list(results)
    lines = [
        head,
        "",
        "Relative error against fp32 forwards (hidden states after the block; Grams of inputs):",
        "",
    ]
    lines.append("| precision | block | hidden | Gram, q/k/v input | Gram, down input |")
    lines.append("|---|---:|---:|---:|---:|")
    for name in names[1:]:
        r = results[name]
        for b in blocks:
            errors = " | ".join(f"{r[key][b]:.2e}" for key in ("hidden", "gram_qkv", "gram_down"))
            lines.append(f"| {name} | {b} | {errors} |")
    lines += ["", "Forward seconds over all blocks (median, p20..p80 over rounds):", ""]
    lines += ["| precision | s | p20..p80 | x fp32 |", "|---|---:|---|---:|"]
    base = quantiles(results["float32"]["seconds"])[0]
    for name in names:
        med, lo, hi = quantiles(results[name]["seconds"])
        lines.append(f"| {name} | {med:.1f} | {lo:.1f}..{hi:.1f} | {med / base:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--precisions", nargs="+", default=["bfloat16", "bf16-mixed"])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        for name in args.precisions:
            check_forward_dtype(name)
    except ValueError as exc:
        p.error(str(exc))
    if "float32" in args.precisions or len(set(args.precisions)) != len(args.precisions):
        p.error(
            f"--precisions {args.precisions}: give distinct precisions other than float32 (the reference)"
        )
    if min(args.nsamples, args.seqlen, args.batch_size, args.rounds) < 1:
        p.error("--nsamples, --seqlen, --batch-size and --rounds must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    env = environment()
    model, tok = load_model(args.model, dtype=torch.float32)
    ids = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=args.seed)
    with torch.no_grad():
        results = measure(model, ids, args.precisions, args.batch_size, args.rounds)
    n = len(results["float32"]["hidden"])
    shown = sorted({0, 1, n // 4, n // 2, 3 * n // 4, n - 1})
    head = (
        f"{run_line('bench/forward_precision.py', argv, env)}; {args.model} fp32 dense, {args.nsamples} x "
        f"{args.seqlen} calibration tokens (seed {args.seed}), chunks of {args.batch_size}."
    )
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "results": results})
    text = markdown(head, results, shown)
    write_text_atomic(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
