"""Which CPU path a weight-only quantized layer should take, per dtype and M: every candidate timed
interleaved on one weight (the evidence behind ``sparsekit.kernels.quant.DEQUANT_ABOVE_M``).

    python bench/quant_paths.py --out docs/data [--n 1536 --k 576] [--ms 1,16,64,512] [--threads 1]
        [--isas avx512]

Candidates, all on the same [n, k] weight (SmolLM2's up_proj by default) and the same x [M, k]:
dense ``F.linear``; torch's ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``;
sparsekit's ``mm_q8`` (fp32 int8), ``mm_q4`` (int4, x widened to fp32) and ``mm24_q8`` (2:4 +
int8) at the CPU's best ISA level, ``mm24_q8`` again at each ``--isas`` level, and
``mm24_q8_blas`` (dequantized tiles + GEMM, the path above ``DEQUANT_ABOVE_M``); and dequantize
(or decompress) + ``F.linear`` for int8, int4 and 2:4-int8. Weights stay cache-resident (one
copy): this compares paths, the per-layer tables with weights from DRAM (bench/cpu_isa_layers.py)
compare formats.
Writes <out>/quant-paths.json and .md with medians (p20..p80) in ms and the speedup over dense.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.timing import time_cpu_interleaved
from sparsekit.kernels import compress_24, cpu_ext, nm_keep_mask
from sparsekit.kernels.quant import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from sparsekit.kernels.sparse24_cpu import decompress_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def candidates(w: torch.Tensor, x: torch.Tensor, isas: tuple[str, ...] = ()) -> dict:
    """name -> fn() for one weight w [n, k] (fp32) and x [M, k] in the dtype to time; ``isas``
    adds the 2:4-int8 kernel forced at each of those ISA levels."""
    dtype, (n, _) = x.dtype, w.shape
    ext, level = cpu_ext.extension(), cpu_ext.isa_level(cpu_ext.resolve_isa(None))
    wd = w.to(dtype)
    q, s = quantize_int8(w)
    p4, sz = quantize_int4(w, 64)
    sz = sz.to(dtype)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(p4).to(torch.int32), 1)
    w24 = w * nm_keep_mask(w.abs(), 2, 4)
    v24, meta = compress_24(w24)
    q24, s24 = quantize_int8(v24)
    fns = {
        "dense": lambda: F.linear(x, wd),
        "int8 aten op": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s.to(dtype)),
        "int8 dequantize + GEMM": lambda: F.linear(x, dequantize_int8(q, s.to(dtype))),
        "int4 aten op": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed4, 64, sz),
        "int4 dequantize + GEMM": lambda: F.linear(x, dequantize_int4(p4, sz)),
        "2:4-int8 decompress + GEMM": lambda: F.linear(
            x, decompress_rows(q24.to(dtype), meta, 0, n) * s24.to(dtype)[:, None]
        ),
    }
    if ext is not None:
        fns["int8 sparsekit mm_q8"] = lambda: ext.mm_q8(x, q, s, None, level)
        fns["2:4-int8 sparsekit mm24_q8"] = lambda: ext.mm24_q8(x, q24, meta, s24, None, level)
        for isa in isas:
            forced = cpu_ext.isa_level(cpu_ext.resolve_isa(isa))
            fns[f"2:4-int8 sparsekit mm24_q8 @{isa}"] = lambda lv=forced: ext.mm24_q8(
                x, q24, meta, s24, None, lv
            )
        fns["2:4-int8 sparsekit mm24_q8_blas"] = lambda: ext.mm24_q8_blas(
            x, q24, meta, s24, None, level, cpu_ext.BLAS_TILE_BYTES
        )
        # the int4 kernel (fp32 scales), x widened and rearranged inside it as a layer calls it
        sz32 = sz.float().contiguous()
        fns["int4 sparsekit mm_q4"] = lambda: ext.mm_q4(x, p4, sz32, None, 64, level)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports")
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--ms", default="1,16,64,512")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of calls per candidate and cell")
    parser.add_argument("--isas", default="", help="comma-separated ISA levels to time mm24_q8 at as well")
    args = parser.parse_args()
    isas = tuple(i for i in args.isas.split(",") if i)
    for isa in isas:  # a level this CPU lacks is refused here, before any timing
        try:
            cpu_ext.resolve_isa(isa)
        except ValueError as exc:
            parser.error(f"--isas: {exc}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.n, args.k, generator=gen) / args.k**0.5
    rows = []
    for name, dtype in DTYPES.items():
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, args.k, generator=gen).to(dtype)
            with torch.no_grad():
                timings = time_cpu_interleaved(candidates(w, x, isas), min_time_s=args.min_time)
            dense = timings["dense"].median_ms
            for path, t in timings.items():
                rows.append(
                    {
                        "dtype": name,
                        "m": m,
                        "path": path,
                        "median_ms": t.median_ms,
                        "p20_ms": t.p20_ms,
                        "p80_ms": t.p80_ms,
                        "speedup": dense / t.median_ms,
                    }
                )
    env = environment()
    command = (
        f"python bench/quant_paths.py --out {args.out} --n {args.n} --k {args.k} --ms {args.ms} "
        f"--threads {args.threads} --min-time {args.min_time}" + (f" --isas {args.isas}" if isas else "")
    )
    md = [
        f"# Quantized-layer CPU paths on one [{args.n}, {args.k}] weight",
        "",
        f"`{command}` on {env['cpu']}, {args.threads} thread(s), torch {env['torch']}, commit "
        f"{env['commit']}, {env['time_utc']}. Every candidate of a (dtype, M) cell timed interleaved; "
        "weights cache-resident. ms: median (p20..p80); x: dense / this.",
        "",
        "| dtype | M | path | ms | x dense |",
        "|---|---:|---|---:|---:|",
    ]
    md += [
        f"| {r['dtype']} | {r['m']} | {r['path']} | {r['median_ms']:.3f} "
        f"({r['p20_ms']:.3f}..{r['p80_ms']:.3f}) | {r['speedup']:.2f} |"
        for r in rows
    ]
    out = Path(args.out)
    write_json_atomic(out / "quant-paths.json", {"command": command, "env": env, "rows": rows})
    write_text_atomic(out / "quant-paths.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
