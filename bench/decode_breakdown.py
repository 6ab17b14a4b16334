"""Does the per-layer table add up to the end-to-end decode time? SmolLM2-135M, dense and 2:4, fp32 and bf16.

    python bench/decode_breakdown.py --out reports/breakdown [--threads 2] [--new-tokens 16]

For each variant (dense and 2:4-sparsified SmolLM2, in fp32 and in bf16; the 2:4 weights are
magnitude-pruned: the decode speed of a 2:4 model does not depend on which weights were kept):
  1. each decode step split into linears / lm_head / attention / rest (``decode_breakdowns``:
     forward hooks with wall clocks), and the same steps without hooks (TPOT);
  2. the same linears alone, as the per-layer harness times them (``LayersAlone``: one module per
     layer of the model on random weights of the same shape and format, so the weights stream
     from DRAM as often as in the model), added up per weight shape and in total;
  all in rounds, each round running every model hooked, plain and alone in turn (the VM's speed
  drifts by tens of percent over minutes: only interleaved measurements compare).
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.breakdown import breakdown_markdown, consistency_rows, decode_breakdowns
from sparsekit.bench.e2e import prompt_ids, sparsified_copy
from sparsekit.bench.roofline import measure_roofline
from sparsekit.hf.models import load_model
from sparsekit.models import model_bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/breakdown", help="output path without suffix")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    prompts, source = prompt_ids(tok, 1, args.prompt_len)
    variants = {}
    for dname in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        dense = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
        variants[f"dense {dname}"] = dense
        variants[f"2:4 {dname}"] = sparsified_copy(dense, "2:4")[0]
    breakdowns = decode_breakdowns(variants, prompts, args.new_tokens, rounds=args.rounds)
    env = environment()
    named, out_rows = [], []
    for name, variant in variants.items():
        b = breakdowns[name]
        named.append((name, b))
        floor = model_bytes(variant) / (measure_roofline("cpu").read_gbps * 1e9) * 1e3
        out_rows.append(
            {
                "variant": name,
                "tpot": {
                    "tpot_ms": b.plain_step_ms,
                    "tpot_p20_ms": b.plain_step_p20_ms,
                    "tpot_p80_ms": b.plain_step_p80_ms,
                },
                "model_bytes": model_bytes(variant),
                "bandwidth_floor_ms": floor,
                "breakdown": b.to_dict(),
                "consistency": consistency_rows(b),
            }
        )
    roof = measure_roofline("cpu")
    env = {**env, "torch_threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"env": env, "roofline": asdict(roof), "rows": out_rows})
    lines = [
        f"# Decode step of {args.model}: in-model breakdown vs the per-layer table",
        "",
        f"`python bench/decode_breakdown.py --out {args.out}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`",
        "",
        f"CPU {env.get('cpu')}, {env['torch_threads']} threads, torch {env.get('torch')}, commit "
        f"{env.get('commit')}, {env.get('time_utc')}. Batch 1, {args.prompt_len}-token prompt ({source}), "
        f"{args.new_tokens} new tokens; {args.rounds} rounds, each running every model once with hooks, once "
        "without (TPOT) and as many steps of its linears alone (one module per layer of the model, "
        "random weights of the same shape and format: the per-layer harness's measurement); medians "
        f"over the steps. Read bandwidth {roof.read_gbps:.1f} GB/s, copy {roof.copy_gbps:.1f} GB/s.",
        "",
        "| variant | model MB | TPOT ms (p20-p80) | bandwidth floor ms | TPOT / floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in out_rows:
        t = r["tpot"]
        lines.append(
            f"| {r['variant']} | {r['model_bytes'] / 1e6:.0f} | {t['tpot_ms']:.2f} ({t['tpot_p20_ms']:.2f}-"
            f"{t['tpot_p80_ms']:.2f}) | {r['bandwidth_floor_ms']:.2f} | "
            f"{t['tpot_ms'] / r['bandwidth_floor_ms']:.2f}x |"
        )
    lines += ["", breakdown_markdown(named)]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
