"""Which C++ CPU kernel path wins at which M: direct vs blas (decompressed tiles + ATen GEMM).

    python bench/cpu_paths.py --out docs/data/cpu-paths [--ms 1,4,8,16,32,64] [--min-time 0.1]
        [--isas avx512,avx2,scalar] [--formats 2:4,bitmap] [--dtypes fp32,bf16]

For every SmolLM2-135M linear shape, M, dtype (fp32, bf16), format (2:4, bitmap at 50%) and ISA
(scalar, avx2, avx512, avx512-bf16: each forced), times the kernel with ``path='direct'`` and ``path='blas'``
next to dense ``F.linear``, all interleaved in the same rounds, each rotated over copies of its
weight adding up to ``--pool-mib`` (weights from DRAM, as in decode). Prints and writes the
medians and, per (format, ISA, dtype), the largest M at which direct beat blas on the geometric
mean over shapes: the ``DIRECT_MAX_M`` table of ``sparsekit/kernels/cpu_ext.py``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.layers import linear_shapes
from sparsekit.bench.timing import Rotation, copies_for, time_cpu_interleaved
from sparsekit.kernels import compress_24, compress_bitmap, cpu_ext
from sparsekit.kernels.bitmap_cpu import bitmap_mm_cpu
from sparsekit.kernels.sparse24_cpu import sparse24_mm_cpu
from sparsekit.kernels.topk_select import nm_keep_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ISAS = ("avx512", "avx2", "scalar")
FORMATS = ("2:4", "bitmap")


def _weights(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    return {
        "dense": w.to(dtype),
        "2:4": (w * nm_keep_mask(w.abs(), 2, 4)).to(dtype),
        "bitmap": (w * (torch.rand(n, k, generator=gen) >= 0.5)).to(dtype),
    }


def _maker(fmt: str, isa: str | None, path: str | None, w: torch.Tensor, x: torch.Tensor):
    """() -> fn: one call on a fresh copy of the weight in ``fmt`` (compressed once, copies cloned)."""
    if fmt == "dense":
        return lambda: (lambda wc: lambda: F.linear(x, wc))(w.clone())
    parts = compress_24(w) if fmt == "2:4" else compress_bitmap(w)
    kernel = sparse24_mm_cpu if fmt == "2:4" else bitmap_mm_cpu

    def make():
        copy = [t.clone() for t in parts]
        return lambda: kernel(x, *copy, isa=isa, path=path)

    return make


def _bytes(fmt: str, w: torch.Tensor) -> int:
    if fmt == "dense":
        return w.numel() * w.element_size()
    parts = compress_24(w) if fmt == "2:4" else compress_bitmap(w)
    return sum(t.numel() * t.element_size() for t in parts)


def run(
    ms: tuple[int, ...],
    isas: tuple[str, ...],
    min_time: float,
    pool_mib: int,
    formats: tuple[str, ...] = FORMATS,
    dtypes: tuple[str, ...] = tuple(DTYPES),
) -> list[dict]:
    rows = []
    shapes = linear_shapes("smollm2")
    for dname in dtypes:
        dtype = DTYPES[dname]
        for shape in shapes:
            weights = _weights(shape.n, shape.k, dtype)
            for m in ms:
                x = torch.randn(1, m, shape.k).to(dtype)
                variants = {"dense": ("dense", None, None)}
                for fmt in formats:
                    for isa in isas:
                        for path in ("direct", "blas"):
                            variants[f"{fmt} {isa} {path}"] = (fmt, isa, path)
                fns = {}
                for name, (fmt, isa, path) in variants.items():
                    make = _maker(fmt, isa, path, weights[fmt], x)
                    count = copies_for(_bytes(fmt, weights[fmt]), pool_mib << 20)
                    rotation = Rotation([make() for _ in range(count)])
                    rotation.warm()
                    fns[name] = rotation
                timings = time_cpu_interleaved(fns, min_time_s=min_time)
                for name, (fmt, isa, path) in variants.items():
                    t = timings[name]
                    rows.append(
                        dict(
                            dtype=dname,
                            n=shape.n,
                            k=shape.k,
                            layers=shape.layers,
                            m=m,
                            format=fmt,
                            isa=isa,
                            path=path,
                            median_ms=t.median_ms,
                            p20_ms=t.p20_ms,
                            p80_ms=t.p80_ms,
                            vs_dense=timings["dense"].median_ms / t.median_ms,
                        )
                    )
                print(
                    f"{dname} {shape.n}x{shape.k} M={m}: dense {timings['dense'].median_ms:.3f} ms; "
                    + ", ".join(f"{n} {timings[n].median_ms:.3f}" for n in variants if n != "dense"),
                    flush=True,
                )
                del fns
    return rows


def thresholds(rows: list[dict]) -> dict[str, int]:
    """(format isa dtype) -> largest M of the grid before the first M at which blas beat direct
    on the geometric mean of the per-shape time ratios."""
    out = {}
    keys = sorted({(r["format"], r["isa"], r["dtype"]) for r in rows if r["format"] != "dense"})
    for fmt, isa, dtype in keys:
        ms = sorted({r["m"] for r in rows})
        best = ms[0]
        for m in ms:
            sel = [r for r in rows if (r["format"], r["isa"], r["dtype"], r["m"]) == (fmt, isa, dtype, m)]
            by_shape: dict[tuple[int, int], dict[str, float]] = {}
            for r in sel:
                by_shape.setdefault((r["n"], r["k"]), {})[r["path"]] = r["median_ms"]
            ratios = [v["blas"] / v["direct"] for v in by_shape.values() if {"blas", "direct"} <= v.keys()]
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
            if geo < 1.0:
                break
            best = m
        out[f"{fmt} {isa} {dtype}"] = best
    return out


def markdown(rows: list[dict], limits: dict[str, int], env: dict, command: str) -> str:
    lines = [
        "# C++ CPU kernel paths: direct vs blas (decompressed tiles + ATen GEMM), against dense",
        "",
        f"`{command}`",
        "",
        f"CPU {env['cpu']}, {env['cpu_threads']} threads, torch {env['torch']}, commit {env['commit']}, "
        f"{env['time_utc']}. Every variant of a cell timed interleaved, weights rotated over copies "
        "(from DRAM); median ms (p20..p80); x dense = dense median / this median.",
        "",
        "| dtype | shape | M | format | isa | direct ms | blas ms | direct x dense | blas x dense |",
        "|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    index = {(r["dtype"], r["n"], r["k"], r["m"], r["format"], r["isa"], r["path"]): r for r in rows}
    for (dtype, n, k, m, fmt, isa, path), r in index.items():
        if path != "direct":
            continue
        b = index[(dtype, n, k, m, fmt, isa, "blas")]
        cells = [f"{t['median_ms']:.3f} ({t['p20_ms']:.3f}..{t['p80_ms']:.3f})" for t in (r, b)]
        lines.append(
            f"| {dtype} | {n}x{k} | {m} | {fmt} | {isa} | {cells[0]} | {cells[1]} "
            f"| {r['vs_dense']:.2f}x | {b['vs_dense']:.2f}x |"
        )
    lines += ["", "Largest M at which direct beat blas (geometric mean over the shapes):", ""]
    lines += [f"- {key}: {m}" for key, m in limits.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/cpu-paths", help="output path without suffix")
    parser.add_argument("--ms", default="1,4,8,16,32,64")
    parser.add_argument("--isas", default=",".join(ISAS))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of calls per variant and cell")
    parser.add_argument("--pool-mib", type=int, default=128, help="weight copies per variant, MiB")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_ext.extension() is None:
        raise SystemExit(f"the C++ CPU extension did not build: {cpu_ext.build_error()}")
    ms = tuple(int(m) for m in args.ms.split(","))
    isas, formats, dtypes = (tuple(v.split(",")) for v in (args.isas, args.formats, args.dtypes))
    for name, got, known in (("--formats", formats, FORMATS), ("--dtypes", dtypes, tuple(DTYPES))):
        unknown = sorted(set(got) - set(known))
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    for isa in isas:  # a level this CPU lacks is refused here, before any timing
        try:
            cpu_ext.resolve_isa(isa)
        except ValueError as exc:
            parser.error(f"--isas: {exc}")
    rows = run(ms, isas, args.min_time, args.pool_mib, formats, dtypes)
    limits = thresholds(rows)
    env = environment()
    command = "python bench/cpu_paths.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
    )
    out = Path(args.out)
    write_json_atomic(
        out.with_suffix(".json"), {"env": env, "command": command, "rows": rows, "direct_max_m": limits}
    )
    write_text_atomic(out.with_suffix(".md"), markdown(rows, limits, env, command))
    print(markdown(rows, limits, env, command))


if __name__ == "__main__":
    main()
