"""What one call of a CPU layer costs beside its kernel, by how it is called, interleaved.

    python bench/op_overhead.py --out docs/data/op-overhead [--n 1536 --k 576] [--threads 2]

On one 2:4 weight [n, k] (SmolLM2's up_proj by default) and x [1, k] (decode), in fp32 and bf16:
  bound      the eager layer's call: ``bind_sparse24_cpu`` checked everything once
  C++ op     ``torch.ops.sparsekit.mm24_routed.default`` with its route arguments, what a compiled
             CPU graph calls without grad (a C++ kernel on the dispatcher: csrc/ops_cpu.cpp)
  Python op  the same call as an op whose CPU kernel is Python (a ``torch.library.Library`` op
             defined here, as sparsekit's compiled graphs called before the C++ ops)
  custom op  ``torch.ops.sparsekit.sparse24_mm`` (``torch.library.custom_op``), what a graph calls
             when x requires grad
and dense ``F.linear`` for scale; the same for the 2:4 + int8 format (bound, C++ op). Every call on
the same weight (cache-resident): the differences are the per-call overhead a decode step pays
once per layer. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.timing import time_cpu_interleaved
from sparsekit.kernels import compress_24, cpu_ext, nm_keep_mask
from sparsekit.kernels.quant import bind_sparse24_int8_cpu, quantize_int8, sparse24_int8_kernel_max_m
from sparsekit.kernels.sparse24_cpu import bind_sparse24_cpu, sparse24_mm_cpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_BENCH_LIB = torch.library.Library("sparsekit_bench", "DEF")
_BENCH_LIB.define("py_mm24(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor")
_BENCH_LIB.impl("py_mm24", sparse24_mm_cpu, "CPU")


def calls(n: int, k: int, dtype: torch.dtype) -> dict:
    """name -> fn() for one 2:4 weight [n, k] in ``dtype`` and x [1, k]."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    w = (w * nm_keep_mask(w.abs(), 2, 4)).to(dtype)
    values, meta = compress_24(w)
    q, scale = quantize_int8(w.float())
    qv, qm = compress_24(q.float())
    qv = qv.to(torch.int8)
    x = torch.randn(1, k, generator=gen).to(dtype)
    bound = bind_sparse24_cpu(values, meta)
    bound_q = bind_sparse24_int8_cpu(qv, qm, scale)
    route = cpu_ext.route_args("2:4", dtype, k)
    route_q = cpu_ext.route_args("2:4-int8", dtype, k, lambda isa: sparse24_int8_kernel_max_m(isa, dtype))
    routed, routed_q = torch.ops.sparsekit.mm24_routed.default, torch.ops.sparsekit.mm24_q8_routed.default
    return {
        "dense F.linear": lambda: F.linear(x, w),
        "2:4 bound": lambda: bound(x, None),
        "2:4 C++ op": lambda: routed(x, values, meta, None, *route),
        "2:4 Python op": lambda: torch.ops.sparsekit_bench.py_mm24.default(x, values, meta, None),
        "2:4 custom op": lambda: torch.ops.sparsekit.sparse24_mm.default(x, values, meta, None, False),
        "2:4-int8 bound": lambda: bound_q(x, None),
        "2:4-int8 C++ op": lambda: routed_q(x, qv, qm, scale, None, *route_q),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="path stem of the .json / .md report")
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-time", type=float, default=0.5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        for name, dtype in DTYPES.items():
            t = time_cpu_interleaved(calls(args.n, args.k, dtype), warmup=20, min_time_s=args.min_time)
            for call, timing in t.items():
                own = f"{call.split(' ')[0]} bound"
                bound_us = t[own if own in t else "2:4 bound"].median_ms * 1e3
                us = timing.median_ms * 1e3
                rows.append(
                    dict(dtype=name, call=call, median_us=us, p20_us=timing.p20_ms * 1e3,
                         p80_us=timing.p80_ms * 1e3, over_bound_us=us - bound_us)
                )  # fmt: skip
    meta = {"command": "python bench/op_overhead.py " + " ".join(sys.argv[1:]), "env": environment(),
            "n": args.n, "k": args.k, "threads": torch.get_num_threads()}  # fmt: skip
    write_json_atomic(args.out.with_suffix(".json"), {"meta": meta, "rows": rows})
    lines = [
        f"# Per-call cost of a CPU 2:4 / 2:4 + int8 layer [{args.n}, {args.k}] at M = 1, by how it is called",
        "",
        f"`{meta['command']}`",
        "",
        f"Machine: {meta['env'].get('cpu', '?')}, {meta['threads']} threads, "
        f"torch {meta['env'].get('torch', '?')}. Interleaved rounds, weight cache-resident.",
        "",
        "| dtype | call | us (p20..p80) | over the format's bound call (dense: 2:4's), us |",
        "|---|---|---|---:|",
    ]
    lines += [
        f"| {r['dtype']} | {r['call']} | {r['median_us']:.1f} ({r['p20_us']:.1f}..{r['p80_us']:.1f}) | "
        f"{r['over_bound_us']:+.1f} |"
        for r in rows
    ]
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
