"""CPU decode (M = 1) GEMV: the 2:4 compressed weight against dense F.linear.

    python bench/cpu_decode.py --out bench/results/cpu_decode   # writes .json and .md

Cases per (shape, dtype):
  dense        F.linear(x, W)                      W [N, K] dense, the baseline
  24_eager     sparse24_mm (CPU torch path)        decompress to dense every call, then F.linear
  24_fused     torch.compile'd gather-FMA          reads values + meta only, never builds W:
               y[n] = sum_g x[4g + i0] * v0 + x[4g + i1] * v1   (i0, i1 from the meta nibble)
Timings are medians (p20/p80) of ``--repeats`` calls after warm-up; ratio = case / dense (< 1 is
faster). bytes = what the layer holds (values + meta vs the dense weight).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit.bench.env import environment
from sparsekit.kernels import compress_24, nm_keep_mask, sparse24_mm

SHAPES = {  # (N out, K in)
    "smollm2.qkvo": (576, 576),
    "smollm2.up": (1536, 576),
    "smollm2.down": (576, 1536),
    "llama7b.qkvo": (4096, 4096),
    "llama7b.up": (11008, 4096),
    "llama7b.down": (4096, 11008),
}


def fused_24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """x [M, K], values [N, K/2], meta [N, K/8] uint8 -> y [M, N], fp32 accumulation."""
    n, half = values.shape
    groups = half // 2
    nib = torch.stack((meta & 15, meta >> 4), dim=-1).reshape(n, -1)[:, :groups].to(torch.int64)
    base = torch.arange(groups, device=x.device) * 4
    c0, c1 = base + (nib & 3), base + (nib >> 2)  # [N, G] input columns of the two kept values
    v = values.view(n, groups, 2).float()
    xf = x.float()
    y = (xf[:, c0] * v[..., 0] + xf[:, c1] * v[..., 1]).sum(-1)
    return y.to(x.dtype)


def setup_dense(n, k, dtype):
    w = torch.randn(n, k).to(dtype)
    w = w * nm_keep_mask(w.abs().float(), 2, 4)
    return w, (lambda x: F.linear(x, w)), w.numel() * w.element_size()


def setup_24_eager(w):
    values, meta = compress_24(w)
    return (lambda x: sparse24_mm(x, values, meta)), values.numel() * values.element_size() + meta.numel()


def setup_24_fused(w):
    values, meta = compress_24(w)
    torch._dynamo.reset()  # one compile per (shape, dtype); the recompile limit would stop the sweep
    fn = torch.compile(fused_24, dynamic=False, fullgraph=True)
    return (lambda x: fn(x, values, meta)), values.numel() * values.element_size() + meta.numel()


def timeit(fn, x, repeats: int, warmup: int = 3) -> dict:
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e6)
    q = statistics.quantiles(times, n=10)
    return {"median_us": statistics.median(times), "p20_us": q[1], "p80_us": q[7]}


def run(shapes: list[str], dtypes: list[torch.dtype], repeats: int) -> list[dict]:
    env = environment()
    rows = []
    for name in shapes:
        n, k = SHAPES[name]
        for dtype in dtypes:
            torch.manual_seed(0)
            w, dense_fn, dense_bytes = setup_dense(n, k, dtype)
            x = torch.randn(1, k).to(dtype)
            ref = dense_fn(x).float()
            base = timeit(dense_fn, x, repeats)
            cases = {"dense": (dense_fn, dense_bytes)}
            cases["24_eager"] = setup_24_eager(w)
            cases["24_fused"] = setup_24_fused(w)
            for case, (fn, nbytes) in cases.items():
                t = base if case == "dense" else timeit(fn, x, repeats)
                err = (fn(x).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
                row = {
                    "shape": name,
                    "N": n,
                    "K": k,
                    "M": 1,
                    "dtype": str(dtype).replace("torch.", ""),
                    "case": case,
                    **t,
                    "ratio_time": t["median_us"] / base["median_us"],
                    "bytes": nbytes,
                    "ratio_bytes": nbytes / dense_bytes,
                    "GB/s": nbytes / (t["median_us"] * 1e-6) / 1e9,
                    "max_rel_err": err,
                    **env,
                }
                rows.append(row)
                print(
                    f"{name:14s} {row['dtype']:8s} {case:9s} {t['median_us']:9.1f} us  "
                    f"x{row['ratio_time']:.2f} time  x{row['ratio_bytes']:.3f} bytes  {row['GB/s']:.1f} GB/s",
                    flush=True,
                )
    return rows


def to_markdown(rows: list[dict]) -> str:
    env = rows[0]
    lines = [
        f"CPU decode GEMV (M=1): {env['cpu']}, {env['cpu_threads']} threads, torch {env['torch']}, "
        f"commit {env['commit']}, {env['time_utc']}",
        "",
        "| shape | N x K | dtype | case | median us (p20-p80) | time vs dense | bytes vs dense | GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['N']}x{r['K']} | {r['dtype']} | {r['case']} | {r['median_us']:.1f} "
            f"({r['p20_us']:.1f}-{r['p80_us']:.1f}) | {r['ratio_time']:.2f} | {r['ratio_bytes']:.3f} | "
            f"{r['GB/s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory_report(dtype: torch.dtype) -> dict:
    """SmolLM2 pruned 2:4 (magnitude): model bytes and process RSS before and after sparsify."""
    import gc

    from sparsekit.hf.models import load_model
    from sparsekit.nn import sparsify
    from sparsekit.nn.sparsify import model_bytes, release_memory
    from sparsekit.pruning import PruneConfig, prune_model

    model, _ = load_model("smollm2", dtype=dtype)
    prune_model(model, None, PruneConfig(method="magnitude", sparsity="2:4", show_progress=False))
    gc.collect()
    release_memory()
    before = {"model_bytes": model_bytes(model), "rss_bytes": rss_bytes()}
    report = sparsify(model)
    gc.collect()
    release_memory()
    after = {"model_bytes": model_bytes(model), "rss_bytes": rss_bytes()}
    out = {"dtype": str(dtype).replace("torch.", ""), "before": before, "after": after, **report.to_dict()}
    out.pop("skipped")
    mb = 1 / 2**20
    print(
        f"{out['dtype']}: model {before['model_bytes'] * mb:.1f} -> {after['model_bytes'] * mb:.1f} MiB, "
        f"RSS {before['rss_bytes'] * mb:.1f} -> {after['rss_bytes'] * mb:.1f} MiB, "
        f"linear weights {report.layer_bytes_before * mb:.1f} -> {report.layer_bytes_after * mb:.1f} MiB"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results/cpu_decode", help="path prefix for .json and .md")
    p.add_argument("--memory", action="store_true", help="only the SmolLM2 sparsify memory report")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(memory_report(getattr(torch, args.dtypes[0])), indent=1))
        return 0
    rows = run(args.shapes, [getattr(torch, d) for d in args.dtypes], args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(to_markdown(rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
