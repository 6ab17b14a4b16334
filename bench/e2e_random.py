"""End to end decode of a random-weight model of a real architecture's shape, interleaved.

    python bench/e2e_random.py --shape llama-2-7b --layers 4 --dtypes fp32 --quantize int8 \
        --quantize-head --out docs/data/e2e-zen3-llama7b-4layers

SmolLM2's rows are 576 wide; a 7B model's are 4096-11008 wide, where per layer the formats part
by their bytes. Speed does not depend on weight values, so this builds the shipped shape config
(``sparsekit/bench_shapes``) with transformers' random initialisation (``random_model``; ``--layers``
of them, the rest of the architecture as shipped: widths, GQA heads, vocabulary, untied head) and
runs ``run_e2e`` on it: the 2:4 variant is magnitude-pruned (no calibration), prompts are random
token ids and there is no perplexity (the weights are random). Writes the e2e report to --out.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sparsekit.bench.e2e import check_quantize, run_e2e, write_e2e_report
from sparsekit.bench.random_model import random_model, shape_config
from sparsekit.bench.timing import choose_threads
from sparsekit.kernels.dtypes import parse_dtype


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b", help="a shipped shape config (sparsekit/bench_shapes)")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks to build (the full depth: 0)")
    p.add_argument("--shrink", type=int, default=1, help="divide widths and vocabulary by this (a dry run)")
    p.add_argument("--dtypes", default="fp32", help="e.g. fp32,bf16")
    p.add_argument("--quantize", default="int8", help="e.g. int8 (empty: none)")
    p.add_argument("--quantize-head", action="store_true", help="add head-quantized twins")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd twins")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=8, help="interleaved rounds after one untimed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    quantize = check_quantize(tuple(q for q in a.quantize.split(",") if q))
    dtypes = tuple(parse_dtype(d) for d in a.dtypes.split(","))
    _, threads_note = choose_threads(a.threads)
    fields = shape_config(a.shape, a.layers or None, a.shrink)
    model = random_model(a.shape, dtypes[0], "cpu", num_layers=a.layers or None, shrink=a.shrink)
    ids = torch.randint(
        0, fields["vocab_size"], (1, a.prompt_len), generator=torch.Generator().manual_seed(0)
    )
    result = run_e2e(
        model,
        input_ids=ids,
        new_tokens=a.new_tokens,
        compile=a.compile,
        eval_tokens=0,
        repeats=a.repeats,
        model_label=f"random {fields['name']}, {fields['num_hidden_layers']} layers",
        method="magnitude",
        dtypes=dtypes,
        quantize=quantize,
        quantize_head=a.quantize_head,
    )
    result.config["threads_note"] = threads_note
    result.config["command"] = "python bench/e2e_random.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    paths = write_e2e_report(result, a.out)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
