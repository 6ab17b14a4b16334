"""How big a tile the CPU blas paths should decompress per GEMM call: every format's blas path at
each tile size, against dense ``F.linear``, interleaved (the evidence behind ``TILE_BYTES`` in
sparsekit/kernels/csrc/cpu_common.cpp and ``cpu_ext.BLAS_TILE_BYTES``).

    python bench/blas_tiles.py --out docs/data [--tiles 0.5,2,8] [--ms 64,512] [--threads 2]
        [--formats 2:4,bitmap,int8,int4,2:4-int8] [--shapes smollm2-135m,llama-2-7b]

The blas path (above the direct kernels' M: prefill, batches) decompresses or dequantizes a tile of
weight rows into a per-thread buffer and hands it to ATen's GEMM. Per (dtype, M, shape) cell the
dense weight and every (format, tile) variant rotate over copies adding up to ``--pool-mib``
(weights read from DRAM, as in a model), all interleaved. Weights: SmolLM2-135M's (and optionally
Llama-2-7B's) linear shapes; 2:4 and 2:4-int8 on a 2:4-pruned weight, bitmap at 50% random,
int8 / int4 (groups of 64) on the unpruned one. Writes <out>/<stem>.json and .md: medians
(p20..p80), speedup over dense, and per (dtype, M, format, tile) the geometric mean over shapes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.layers import linear_shapes
from sparsekit.bench.timing import Rotation, copies_for, time_cpu_interleaved
from sparsekit.kernels import compress_24, cpu_ext, nm_keep_mask
from sparsekit.kernels.bitmap import compress_bitmap
from sparsekit.kernels.quant import quantize_int4, quantize_int8

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("2:4", "bitmap", "int8", "int4", "2:4-int8")


def stored(fmt: str, w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The tensors ``fmt``'s blas call reads, from the fp32 weight w [N, K]."""
    if fmt in ("2:4", "2:4-int8"):
        values, meta = compress_24(w * nm_keep_mask(w.abs(), 2, 4))
        if fmt == "2:4":
            return values.to(dtype), meta
        q, s = quantize_int8(values)
        return q, meta, s.float()
    if fmt == "bitmap":
        gen = torch.Generator().manual_seed(1)
        return compress_bitmap((w * (torch.rand(w.shape, generator=gen) >= 0.5)).to(dtype))
    if fmt == "int8":
        q, s = quantize_int8(w)
        return q, s.float()
    packed, sz = quantize_int4(w, 64)
    return packed, sz.float().contiguous()


def blas_call(fmt: str, x: torch.Tensor, parts: tuple[torch.Tensor, ...], tile_bytes: int):
    """() -> y [M, N]: ``fmt``'s C++ blas path on x at the CPU's best ISA, tiles of ``tile_bytes``."""
    ext, level = cpu_ext.extension(), cpu_ext.isa_level(cpu_ext.resolve_isa(None))
    calls = {
        "2:4": lambda: ext.mm24(x, *parts, None, level, 1, tile_bytes),
        "bitmap": lambda: ext.mm_bitmap(x, *parts, None, level, 1, tile_bytes),
        "int8": lambda: ext.mm_q8_blas(x, *parts, None, level, tile_bytes),
        "int4": lambda: ext.mm_q4_blas(x, *parts, None, 64, level, tile_bytes),
        "2:4-int8": lambda: ext.mm24_q8_blas(x, *parts, None, level, tile_bytes),
    }
    return calls[fmt]


def _rotated(make, one_copy_bytes: int, pool_bytes: int) -> Rotation:
    rotation = Rotation([make() for _ in range(copies_for(one_copy_bytes, pool_bytes))])
    rotation.warm()
    return rotation


def cell(w: torch.Tensor, x: torch.Tensor, formats, tiles_mib, pool_bytes: int) -> dict:
    """name -> Rotation for one (shape, dtype, M) cell: dense, then every (format, tile)."""
    wd = w.to(x.dtype)
    fns = {"dense": _rotated(lambda: (lambda wc: lambda: F.linear(x, wc))(wd.clone()), wd.nbytes, pool_bytes)}
    for fmt in formats:
        parts = stored(fmt, w, x.dtype)
        nbytes = sum(t.nbytes for t in parts)
        for tile in tiles_mib:
            tile_bytes = int(tile * 2**20)

            def make(fmt=fmt, parts=parts, tile_bytes=tile_bytes):
                return blas_call(fmt, x, tuple(t.clone() for t in parts), tile_bytes)

            fns[f"{fmt} @ {tile:g} MiB"] = _rotated(make, nbytes, pool_bytes)
    return fns


def summary(rows: list[dict]) -> list[str]:
    """Per dtype and M: each (format, tile)'s geometric-mean speedup over dense across shapes."""
    lines = ["| dtype | M | format | " + " | ".join(f"{t:g} MiB" for t in _tiles(rows)) + " |"]
    lines.append("|---|---:|---|" + "---:|" * len(_tiles(rows)))
    keys = dict.fromkeys((r["dtype"], r["m"], r["format"]) for r in rows if r["format"] != "dense")
    for dtype, m, fmt in keys:
        cells = []
        for tile in _tiles(rows):
            s = [
                r["speedup"]
                for r in rows
                if (r["dtype"], r["m"], r["format"], r["tile_mib"]) == (dtype, m, fmt, tile)
            ]
            geo = math.exp(sum(map(math.log, s)) / len(s))
            cells.append(f"{geo:.2f}x ({min(s):.2f}..{max(s):.2f})")
        lines.append(f"| {dtype} | {m} | {fmt} | " + " | ".join(cells) + " |")
    return lines


def _tile(row: dict) -> str:
    return "" if row["tile_mib"] is None else f"{row['tile_mib']:g}"


def _tiles(rows: list[dict]) -> list[float]:
    return sorted({r["tile_mib"] for r in rows if r["tile_mib"] is not None})


def _parse(parser: argparse.ArgumentParser, args: argparse.Namespace):
    try:
        tiles = tuple(float(t) for t in args.tiles.split(","))
        ms = tuple(int(m) for m in args.ms.split(","))
    except ValueError as exc:
        parser.error(f"--tiles takes MiB numbers and --ms integers: {exc}")
    formats = tuple(args.formats.split(","))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if cpu_ext.extension() is None:
        parser.error(f"the C++ CPU extension did not build: {cpu_ext.build_error()}")
    shapes = [s for name in args.shapes.split(",") for s in linear_shapes(name)]
    return tiles, ms, formats, shapes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports")
    parser.add_argument("--stem", default="blas-tiles", help="report file name without suffix")
    parser.add_argument("--tiles", default="0.5,2,8", help="tile sizes in MiB")
    parser.add_argument("--ms", default="64,512")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--shapes", default="smollm2-135m", help="shape sets (sparsekit.bench.layers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of calls per variant and cell")
    parser.add_argument("--pool-mib", type=int, default=128, help="weight copies per variant, MiB")
    args = parser.parse_args()
    tiles, ms, formats, shapes = _parse(parser, args)
    torch.set_num_threads(args.threads)
    env = environment()  # the code this run loaded
    rows = []
    cells = [(d, m, s) for d in DTYPES for m in ms for s in shapes]
    for dname, m, shape in tqdm(cells, desc="blas tiles"):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(shape.n, shape.k, generator=gen) / shape.k**0.5
        x = torch.randn(m, shape.k, generator=gen).to(DTYPES[dname])
        with torch.no_grad():
            timings = time_cpu_interleaved(
                cell(w, x, formats, tiles, args.pool_mib << 20), min_time_s=args.min_time
            )
        dense = timings["dense"].median_ms
        for name, t in timings.items():
            fmt, _, tile = name.partition(" @ ")
            rows.append(
                {
                    "dtype": dname, "m": m, "n": shape.n, "k": shape.k, "layers": shape.layers, "format": fmt,
                    "tile_mib": float(tile.split()[0]) if tile else None, "median_ms": t.median_ms,
                    "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "speedup": dense / t.median_ms,
                }
            )  # fmt: skip
    command = (
        f"python bench/blas_tiles.py --out {args.out} --stem {args.stem} --tiles {args.tiles} "
        f"--ms {args.ms} --formats {args.formats} --shapes {args.shapes} --threads {args.threads} "
        f"--min-time {args.min_time} --pool-mib {args.pool_mib}"
    )
    md = [
        "# CPU blas paths: tile size against dense",
        "",
        f"`{command}` on {env['cpu']}, {args.threads} thread(s), torch {env['torch']}, "
        f"commit {env['commit']}, {env['time_utc']} (the code loaded at the start). Weights rotated "
        f"over {args.pool_mib} MiB of copies per variant (DRAM); every variant of a cell interleaved. "
        "Speedup over dense, geometric mean over the shapes (min..max):",
        "",
        *summary(rows),
        "",
        "| dtype | M | shape | format | tile MiB | ms (p20..p80) | x dense |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    md += [
        f"| {r['dtype']} | {r['m']} | {r['n']}x{r['k']} | {r['format']} | "
        f"{_tile(r)} | {r['median_ms']:.3f} "
        f"({r['p20_ms']:.3f}..{r['p80_ms']:.3f}) | {r['speedup']:.2f} |"
        for r in rows
    ]
    out = Path(args.out)
    write_json_atomic(out / f"{args.stem}.json", {"command": command, "env": env, "rows": rows})
    write_text_atomic(out / f"{args.stem}.md", "\n".join(md) + "\n")
    print("\n".join(md[: len(summary(rows)) + 5]))


if __name__ == "__main__":
    main()
