"""CPU 2:4 GEMM at decode against dense F.linear, kernel level.

    python bench/bench_cpu_decode_24.py --out reports/cpu24 [--threads 1] [--quick]

Shapes are weights [N, K] of SmolLM2-135M (576->576, 576->1536, 1536->576) and LLaMA-7B
(4096->4096, 4096->11008, 11008->4096); M in {1, 4, 16}; fp32 and bf16. Each round times dense
eager F.linear, dense torch.compile'd F.linear and sparsekit's sparse24_mm back to back
(interleaved, so a noisy shared machine hits all three alike); rows report medians with p20/p80,
ratio = sparse / best dense (< 1 is faster), bytes held, and the weight stream in GB/s beside the
machine's measured copy bandwidth. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit._io import write_json_atomic, write_text_atomic

SHAPES = {  # name: (N, K) = weight [out_features, in_features]
    "smollm2 576->576": (576, 576),
    "smollm2 576->1536": (1536, 576),
    "smollm2 1536->576": (576, 1536),
    "llama7b 4096->4096": (4096, 4096),
    "llama7b 4096->11008": (11008, 4096),
    "llama7b 11008->4096": (4096, 11008),
}
MS = (1, 4, 16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def setup_case(n: int, k: int, m: int, dtype: torch.dtype) -> dict:
    from sparsekit.kernels import compress_24, sparse24_mm
    from sparsekit.kernels.topk_select import nm_keep_mask

    w = torch.randn(n, k)
    w = (w * nm_keep_mask(w.abs(), 2, 4)).to(dtype)
    values, meta = compress_24(w)
    x = torch.randn(m, k, dtype=dtype)
    dense_c = torch.compile(F.linear, dynamic=False)
    return {
        "fns": {
            "dense": lambda: F.linear(x, w),
            "dense_compiled": lambda: dense_c(x, w),
            "sparse": lambda: sparse24_mm(x, values, meta),
        },
        "bytes_dense": w.nbytes,
        "bytes_sparse": values.nbytes + meta.nbytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/cpu24")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default"
    )
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per row")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shapes only")
    args = parser.parse_args()

    from sparsekit._env import environment
    from sparsekit.bench.roofline import measure_roofline
    from sparsekit.bench.timing import time_cpu_interleaved
    from sparsekit.kernels import sparse24_cpu

    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 1000
    torch._dynamo.config.cache_size_limit = 1000
    t = time.perf_counter()
    built = sparse24_cpu.extension() is not None
    build_s = time.perf_counter() - t
    env = {
        **environment(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "cpu_ext_built": built,
        "cpu_ext_avx512": sparse24_cpu.has_fast_path(),
        "cpu_ext_load_s": round(build_s, 2),
        "copy_GB/s": round(measure_roofline("cpu").copy_gbps, 1),
    }
    rows = []
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("smollm2")}
    for name, (n, k) in shapes.items():
        for dname, dtype in DTYPES.items():
            for m in MS:
                case = setup_case(n, k, m, dtype)
                timings = time_cpu_interleaved(
                    case["fns"], warmup=2, min_repeats=15, max_repeats=400, min_time_s=args.budget / 3
                )
                res = {
                    k: {"median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.repeats}
                    for k, t in timings.items()
                }
                best = min(("dense", "dense_compiled"), key=lambda s: res[s]["median_ms"])
                sp = res["sparse"]
                row = {
                    "shape": name,
                    "N": n,
                    "K": k,
                    "M": m,
                    "dtype": dname,
                    **{f"{fn}_{q}": round(v[q], 4) for fn, v in res.items() for q in v if q != "reps"},
                    "reps": res["sparse"]["reps"],
                    "best_dense": best,
                    "ratio": round(sp["median_ms"] / res[best]["median_ms"], 3),
                    "bytes_dense": case["bytes_dense"],
                    "bytes_sparse": case["bytes_sparse"],
                    "bytes_ratio": round(case["bytes_sparse"] / case["bytes_dense"], 4),
                    "sparse_stream_GB/s": round(case["bytes_sparse"] / sp["median_ms"] / 1e6, 1),
                }
                rows.append(row)
                print(
                    f"{name:22s} {dname} M={m:<3d} dense {res[best]['median_ms']:8.3f} ms ({best}) "
                    f"sparse {sp['median_ms']:8.3f} ms [{sp['p20_ms']:.3f}, {sp['p80_ms']:.3f}] "
                    f"ratio {row['ratio']:.2f} bytes {row['bytes_ratio']:.3f}x",
                    flush=True,
                )
    env["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"env": env, "rows": rows})
    lines = [
        "# CPU 2:4 sparse24_mm vs dense F.linear (kernel level)",
        "",
        f"`python bench/bench_cpu_decode_24.py --out {args.out}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`",
        "",
        f"CPU {env['cpu']}, torch {env['torch']}, {env['torch_threads']} threads, commit {env['commit']}, "
        f"{env['time_utc']}; copy {env['copy_GB/s']} GB/s; load average {env['loadavg_start']} -> "
        f"{env['loadavg_end']} (shared machine: medians of interleaved rounds).",
        "",
        "ratio = sparse median / best dense median (eager or torch.compile'd); < 1 means the 2:4 path "
        "is faster. bytes = (values + meta) / dense weight bytes.",
        "",
        "| weight [N, K] | dtype | M | best dense ms | sparse ms (p20-p80) | ratio | bytes | sparse GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r[f"{r['best_dense']}_median_ms"]
        lines.append(
            f"| {r['shape']} [{r['N']}, {r['K']}] | {r['dtype']} | {r['M']} | {d:.3f} "
            f"({'compiled' if r['best_dense'] == 'dense_compiled' else 'eager'}) | "
            f"{r['sparse_median_ms']:.3f} ({r['sparse_p20_ms']:.3f}-{r['sparse_p80_ms']:.3f}) | "
            f"{r['ratio']:.2f} | {r['bytes_ratio']:.3f} | {r['sparse_stream_GB/s']} |"
        )
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
