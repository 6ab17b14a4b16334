"""SparseGPT CPU solver speed on LLaMA-7B layer shapes, beside torch.mm in the same run.

    python bench/solver_speed.py --out reports/solver_speed   # ~2 min on 2 idle cores

Effective GFLOP/s = rows * cols^2 / seconds (the lazy-update GEMMs of the solve do about
rows * cols^2 flops). The factorization (one Cholesky of the reversed Hessian; the solve never
forms H^-1's factor) is timed on its own and reported with and without it. Writes
``<out>.json`` and ``<out>.md``; every row carries machine info, versions and time.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.timing import time_cpu
from sparsekit.pruning import sparsegpt_prune_ref, sparsegpt_solve
from sparsekit.pruning.sparsegpt import hessian_factor

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # q/k/v/o, gate/up, down
PATTERNS = [0.5, "2:4"]


def realistic_hessian(cols: int, rank: int = 256, outliers: int = 8, seed: int = 0) -> torch.Tensor:
    """E[X^T X] / T for activations X = Z A^T + noise with a few outlier channels (x30), fp32.

    The expectation of the Gram matrix of correlated random activations, built without drawing
    the tokens (a [T, 11008] draw and its X^T X would dominate the run): A [cols, rank] mixes
    ``rank`` latent factors, the noise is per channel, and outlier channels are scaled by 30.
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, rank, generator=g) / rank**0.5
    hessian = mix @ mix.T
    hessian.diagonal().add_(0.1 + torch.rand(cols, generator=g))
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[:outliers]] = 30.0
    return hessian * scale[:, None] * scale[None, :]


def _seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls (the shared harness's timer, no warm-up: runs are long)."""
    return time_cpu(fn, warmup=0, min_repeats=repeats, max_repeats=repeats, min_time_s=0.0).median_ms / 1e3


def matmul_gflops(size: int = 4096, repeats: int = 3) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    return 2 * size**3 / _seconds(lambda: a @ b, repeats) / 1e9


def run(shapes, patterns, repeats: int, with_ref: bool) -> dict:
    torch.manual_seed(0)
    info = environment()
    rows_out = []
    mm = matmul_gflops()
    for rows, cols in shapes:
        hessian = realistic_hessian(cols)
        weight = torch.randn(rows, cols)
        flops = rows * cols**2
        factor_s = _seconds(partial(hessian_factor, hessian, 0.01), repeats)
        for pattern in patterns:
            total_s = _seconds(partial(sparsegpt_solve, weight, hessian, pattern), repeats)
            solve_s = max(total_s - factor_s, 1e-9)
            row = {
                "shape": f"{rows}x{cols}",
                "pattern": str(pattern),
                "factor_s": round(factor_s, 3),
                "solve_s": round(solve_s, 3),
                "total_s": round(total_s, 3),
                "gflops_total": round(flops / total_s / 1e9, 1),
                "gflops_solve_only": round(flops / solve_s / 1e9, 1),
                "mm_gflops": round(mm, 1),
                "pct_mm_total": round(100 * flops / total_s / 1e9 / mm, 1),
                "pct_mm_solve_only": round(100 * flops / solve_s / 1e9 / mm, 1),
            }
            if with_ref and (rows, cols) == (4096, 4096):
                ref_s = _seconds(partial(sparsegpt_prune_ref, weight, hessian, pattern), 1)
                row["ref_total_s"] = round(ref_s, 3)
                row["pct_mm_ref"] = round(100 * flops / ref_s / 1e9 / mm, 1)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        mm = (mm + matmul_gflops()) / 2  # re-measured between shapes: the machine may be shared
    return {"machine": info, "rows": rows_out}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"SparseGPT CPU solver, blocksize 128, fp32 ({m['cpu']}, {m['cpu_threads']} threads, "
        f"torch {m['torch']}, commit {m['commit']}, {m['time_utc']}). "
        "GFLOP/s = rows*cols^2/s (median of --repeats runs); "
        "torch.mm 4096^3 in the same run.",
        "",
        "| shape | pattern | factor s | solve s | total s | GFLOP/s total | GFLOP/s solve only "
        "| torch.mm GFLOP/s | % of mm total | % of mm solve only | plain loop s (% of mm) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ref = f"{r['ref_total_s']} ({r['pct_mm_ref']}%)" if "ref_total_s" in r else ""
        lines.append(
            f"| {r['shape']} | {r['pattern']} | {r['factor_s']} | {r['solve_s']} | {r['total_s']} | "
            f"{r['gflops_total']} | {r['gflops_solve_only']} | {r['mm_gflops']} | {r['pct_mm_total']} | "
            f"{r['pct_mm_solve_only']} | {ref} |"
        )
    return "\n".join(lines) + "\n"


def profile(pattern: str | float = 0.5, top: int = 12) -> str:
    """torch.profiler's table (ops by self CPU time) of one 4096x4096 solve after a warm-up."""
    hessian, weight = realistic_hessian(4096), torch.randn(4096, 4096)
    sparsegpt_solve(weight, hessian, pattern)
    with torch.profiler.profile() as prof:
        sparsegpt_solve(weight, hessian, pattern)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("reports/solver_speed"), help="writes OUT.json, OUT.md"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (min is reported)")
    parser.add_argument("--quick", action="store_true", help="4096x4096 only")
    parser.add_argument(
        "--with-ref", action="store_true", help="also time the plain per-column loop at 4096x4096 (slow)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print where one 4096x4096 solve spends its time (50%%, 2:4)"
    )
    args = parser.parse_args(argv)
    if args.profile:
        for pattern in PATTERNS:
            print(f"pattern {pattern}:\n{profile(pattern)}")
        return 0
    shapes = SHAPES[:1] if args.quick else SHAPES
    result = run(shapes, PATTERNS, args.repeats, args.with_ref)
    write_json_atomic(args.out.with_suffix(".json"), result)
    md = markdown(result)
    write_text_atomic(args.out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
