"""How far rounding-level changes move one prune's perplexity on SmolLM2, per calibration draw.

    python bench/rounding_spread.py --method sparsegpt --sparsity 2:4 --seeds 0 3 4 \\
        --variants float32@4 float32@8 float32@16 auto@8 --out docs/data/rounding_spread_sparsegpt24

A variant is ``FORWARD_DTYPE@BATCH`` or ``FORWARD_DTYPE@BATCH~DRAW``: the calibration forwards'
dtype (``float32``; ``auto``, the default: bf16 where the CPU has fast bf16 matmuls; ``bfloat16``;
``bf16-mixed``: the matmuls in bf16, the hidden states fp32), how many calibration sequences each
block forward takes, optionally a jitter draw: every layer's input statistic (Wanda's squared norms,
SparseGPT's Gram matrix) multiplied elementwise by 1 + J z before the method reads it, z standard
normal from a generator seeded DRAW (symmetric for a Gram matrix), J = ``--jitter`` (default 1e-6: a
few fp32 roundings, the order of the difference between two summation orders of the same statistic
over tens of calibration windows), and optionally ``/sdpa`` or ``/auto``: the calibration forwards'
attention for that variant (``sparsekit.hf.attention.attention_mode``, over
``SPARSEKIT_CPU_ATTENTION``; ``auto``, the default, runs causal attention on sparsekit's CPU kernels
(bf16 or fp32), ``sdpa`` on torch's), so ``auto@8 auto@8/sdpa`` compares the two on the same draws
in one process; and optionally ``+one`` or ``+two`` before that: one calibration forward per block
or two (``sequential=True`` / ``False``; ``+auto`` or no suffix: the method's default), so
``float32@8+one float32@8+two`` compares the two orders. ``--method`` also takes a recipe as
``vs_llmcompressor.py`` writes it (``wanda+owl``). Batch sizes change only the order of the same
fp32 sums (GEMM blocking, the statistics' chunk sums) and jitter draws change the statistics at that
size, so their spread is how much of a gap between two equivalent implementations is rounding; the
forward dtype is the default's one departure from fp32. Issue-28 protocol: SmolLM2-135M fp32, 64 x
512 calibration tokens of the offline corpus per seed, ppl on 32,768 held-out tokens in windows of
512, 2 threads. Writes <out>.json and <out>.md after every prune: per seed each variant's ppl and
prune time, and per variant its ppl over the first variant's on the same seed (median and range over
seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from vs_llmcompressor import recipe_options

import sparsekit
from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.formats import parse_sparsity
from sparsekit.hf.attention import ATTENTION_MODES, active_attention_mode, attention_mode
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.pruning import PASSES
from sparsekit.pruning.method import InputStat, PruningMethod, pruning_method

DTYPES = ("float32", "auto", "bfloat16", "bf16-mixed")
log = logging.getLogger("rounding_spread")


def parse_variant(text: str) -> tuple[str, int, int | None]:
    """'float32@8' -> ('float32', 8, None); 'float32@8~3' -> ('float32', 8, 3) (jitter draw 3);
    raises ValueError naming the accepted form."""
    dtype, sep, rest = text.partition("@")
    batch, tilde, draw = rest.partition("~")
    valid = dtype in DTYPES and sep and batch.isdigit() and int(batch) >= 1
    if not valid or (tilde and not (draw.isdigit() and int(draw) >= 1)):
        raise ValueError(
            f"variant {text!r}: write FORWARD_DTYPE@BATCH or FORWARD_DTYPE@BATCH~DRAW, FORWARD_DTYPE "
            f"one of {DTYPES}, BATCH >= 1, DRAW >= 1 (a jitter draw)"
        )
    return dtype, int(batch), int(draw) if tilde else None


def split_attention(text: str) -> tuple[str, str | None]:
    """'auto@8/sdpa' -> ('auto@8', 'sdpa'); 'auto@8' -> ('auto@8', None); raises ValueError naming the
    accepted attention modes."""
    variant, slash, mode = text.partition("/")
    if slash and mode not in ATTENTION_MODES:
        raise ValueError(f"variant {text!r}: the part after '/' is the attention, one of {ATTENTION_MODES}")
    return variant, mode if slash else None


def split_passes(text: str) -> tuple[str, bool | None]:
    """'float32@8+one' -> ('float32@8', True); 'float32@8' -> ('float32@8', None) (the default);
    raises ValueError naming the accepted values."""
    variant, plus, passes = text.partition("+")
    if plus and passes not in PASSES:
        raise ValueError(f"variant {text!r}: the part after '+' is the passes, one of {tuple(PASSES)}")
    return variant, PASSES[passes] if plus else None


def jitter_(value: torch.Tensor, size: float, generator: torch.Generator) -> torch.Tensor:
    """``value`` (a statistic: [K] or a Gram matrix [K, K], fp32) times 1 + size * z elementwise, z
    standard normal (symmetrised for a square matrix, so a Gram matrix stays symmetric); in place."""
    z = torch.randn(value.shape, generator=generator, dtype=torch.float64)
    if value.dim() == 2 and value.shape[0] == value.shape[1]:
        z = (z + z.T) / 2**0.5
    return value.mul_((1 + size * z).to(value.dtype))


def jittered(method: str, size: float, draw: int) -> PruningMethod:
    """``method``'s object whose ``prune`` reads each layer's statistic jittered by ``jitter_``
    (relative ``size``; one generator seeded ``draw``, drawn in the engine's fixed layer order)."""
    base = type(pruning_method(method))
    generator = torch.Generator().manual_seed(draw)

    class Jittered(base):
        def prune(self, weight: torch.Tensor, stat: InputStat | None, config):
            if stat is not None:
                stat = InputStat(jitter_(stat.value.clone(), size, generator), stat.tokens)
            return super().prune(weight, stat, config)

    return Jittered()


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
        "--method",
        default="sparsegpt",
        help="a sparsekit method name (sparsekit.prune's method=), or a recipe as vs_llmcompressor.py "
        "writes it (wanda+owl: the OWL allocation)",
    )
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=["float32@8", "float32@4", "float32@16", "auto@8"])
    p.add_argument("--model", default="smollm2", help="a model sparsekit.hf.models.load_model knows")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument(
        "--jitter", type=float, default=1e-6, help="relative size of a ~DRAW variant's statistic jitter"
    )
    args = p.parse_args(argv)
    try:
        modes = [split_attention(v) for v in args.variants]
        passes = [split_passes(v) for v, _ in modes]
        parsed = [parse_variant(v) for v, _ in passes]
        score, options = recipe_options(args.method)
        pruning_method(score)
        parse_sparsity(args.sparsity)
    except ValueError as exc:
        p.error(str(exc))
    if not 0 < args.jitter < 1:
        p.error(f"--jitter {args.jitter}: give a relative size in (0, 1), e.g. 1e-6")
    if any(draw for *_, draw in parsed) and pruning_method(score).statistic is None:
        p.error(f"{args.method} reads no calibration statistic: a ~DRAW variant has nothing to jitter")
    if args.jitter != p.get_default("jitter") and not any(draw for *_, draw in parsed):
        p.error(f"--jitter {args.jitter:g} sizes the ~DRAW variants, and none is given: add e.g. float32@8~1")
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
        for variant, (dtype, batch, draw), (_, mode), (_, sequential) in zip(
            args.variants, parsed, modes, passes, strict=True
        ):
            model = copy.deepcopy(dense)
            method = jittered(score, args.jitter, draw) if draw else score
            start = time.perf_counter()
            with attention_mode(mode) if mode else contextlib.nullcontext():
                report = sparsekit.prune(
                    model, method=method, sparsity=args.sparsity, calib=calib, forward_dtype=dtype,
                    batch_size=batch, show_progress=False, sequential=sequential, **options,
                )  # fmt: skip
                attention = active_attention_mode()
            seconds = time.perf_counter() - start
            row = {"seed": seed, "variant": variant, "forward_dtype": report.forward_dtype, "batch": batch,
                   "attention": attention, "sequential": sequential,
                   "jitter": args.jitter if draw else 0.0, "jitter_draw": draw,
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
