"""CPU 2:4 layers at decode against dense, measured two ways: weights from DRAM and cache-resident.

    python bench/bench_cpu_decode_24.py --out reports/cpu24 [--threads 2] [--quick]

Shapes: the linears of SmolLM2-135M (576x576, 192x576, 1536x576, 576x1536) and LLaMA-2-7B
(4096x4096, 11008x4096, 4096x11008); M in {1, 4, 16}; fp32 and bf16. Every cell is timed by
``sparsekit.bench.layers.run_layers`` twice: ``cold`` (each backend rotates over copies of its
layer adding up to twice the last-level cache, so every call reads its weight from DRAM, as a
decode step does) and ``warm`` (one copy, called again and again: the weight stays in cache).
Within each, dense eager, dense torch.compile'd and 2:4 ``SparseLinear`` run interleaved.

Why both: a model's decode streams every layer's weight from DRAM once per token, so ``cold`` is
what adds up to the end-to-end time (bench/decode_breakdown.py checks that); ``warm`` rewards
whichever kernel computes fastest on cached data, which is where 2:4 loses on small shapes.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.layers import LinearShape, run_layers

SHAPES = [
    LinearShape("smollm2-135m", "q_proj,o_proj", 576, 576),
    LinearShape("smollm2-135m", "k_proj,v_proj", 192, 576),
    LinearShape("smollm2-135m", "gate_proj,up_proj", 1536, 576),
    LinearShape("smollm2-135m", "down_proj", 576, 1536),
    LinearShape("llama-2-7b", "q,k,v,o_proj", 4096, 4096),
    LinearShape("llama-2-7b", "gate_proj,up_proj", 11008, 4096),
    LinearShape("llama-2-7b", "down_proj", 4096, 11008),
]
MS = (1, 4, 16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ("dense", "dense-compiled", "2:4")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/cpu24", help="output path without suffix")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, M = 1")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of calls per backend and cell")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for s in SHAPES if not args.quick or s.model.startswith("smollm2")]
    ms = (1,) if args.quick else MS
    rows, env = [], None
    for dname, dtype in DTYPES.items():
        for cold in (True, False):
            result = run_layers(
                shapes, ms, "2:4", BACKENDS, dtype, "cpu", min_time_s=args.min_time, cold=cold
            )
            env = result.env
            for r in result.rows:
                rows.append({**vars(r), "env": {}, "cold": cold, "dtype": dname})
    env = {**env, "torch_threads": torch.get_num_threads(), "loadavg_end": os.getloadavg()}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"env": env, "rows": rows})
    write_text_atomic(out.with_suffix(".md"), _markdown(rows, env, args))


def _markdown(rows: list[dict], env: dict, args) -> str:
    cells: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["layers"], r["n"], r["k"], r["dtype"], r["m"])
        cells.setdefault(key, {})[(r["cold"], r["backend"])] = r
    lines = [
        "# CPU 2:4 SparseLinear vs dense at decode: weights from DRAM (cold) and cache-resident (warm)",
        "",
        f"`python bench/bench_cpu_decode_24.py --out {args.out}"
        + (f" --threads {args.threads}" if args.threads else "")
        + ("  --quick" if args.quick else "")
        + "`",
        "",
        f"CPU {env.get('cpu')}, {env['torch_threads']} threads, torch {env.get('torch')}, commit "
        f"{env.get('commit')}, {env.get('time_utc')}. Medians of interleaved calls; speedup = best dense "
        "(eager or compiled) / 2:4, > 1 means 2:4 is faster.",
        "",
        "| weight [N, K] | dtype | M | cold: dense ms | cold: 2:4 ms (p20-p80) | cold speedup | "
        "warm: dense ms | warm: 2:4 ms | warm speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, layers, n, k, dname, m), c in cells.items():
        parts = []
        for cold in (True, False):
            dense = min(
                (c[(cold, b)] for b in ("dense", "dense-compiled") if (cold, b) in c),
                key=lambda r: r["median_ms"],
            )
            sparse = c[(cold, "2:4")]
            spread = f" ({sparse['p20_ms']:.3f}-{sparse['p80_ms']:.3f})" if cold else ""
            parts += [
                f"{dense['median_ms']:.3f}",
                f"{sparse['median_ms']:.3f}{spread}",
                f"{dense['median_ms'] / sparse['median_ms']:.2f}x",
            ]
        lines.append(f"| {model} {layers} [{n}, {k}] | {dname} | {m} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
