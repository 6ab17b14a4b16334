"""Throughput of the AVX-512 instruction mixes the CPU kernels are built from, on one core.

    python bench/cpu_op_throughput.py --out docs/data/cpu-op-throughput-epyc [--iters 20000000 --rounds 7]

Why: per layer, a kernel whose inner step is slower than dense's caps its speed once the layer is
compute-bound (large M), whatever bytes it saves. Each mix below is a loop of 8 independent chains
(no dependency between iterations but the accumulators') timed on one thread, rounds interleaved;
the report gives millions of steps per second (median, p20..p80) and the dense weight columns one
step covers, so ``columns/ns`` compares a sparse kernel's compute ceiling with dense's on this CPU:

- ``vdpbf16ps`` (bf16 dense, ATen / oneDNN's inner op): 32 columns of one x row per step.
- ``vfmadd231ps`` (fp32 dense): 16 columns.
- ``vpermt2w + vdpbf16ps`` (the 2:4 bf16 kernel at ``avx512-bf16``, ``Sparse24Dot``): 32 kept values
  = 64 columns per step.
- ``vpermt2ps + vfmadd231ps`` (the 2:4 fp32 AVX-512 kernel): 16 kept values = 32 columns.
- ``vpexpandw + 8 vdpbf16ps`` (the bitmap bf16 kernel: one expand per weight row and 32 columns,
  reused by 8 rows of x): 8 x 32 columns per step.
- ``vpshufb + vdpbf16ps`` (an in-lane byte shuffle per dot, for comparison): 32 columns.

Needs a CPU with AVX-512 + AVX512_BF16 + VBMI2 (``avx512-bf16``); elsewhere it stops and says so.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bf16dot_report import require_avx512_bf16, write_report

# name -> (mix id in the C++ below, dense weight columns one step covers)
MIXES = {
    "vdpbf16ps": (0, 32),
    "vfmadd231ps": (1, 16),
    "vpermt2w + vdpbf16ps": (2, 64),
    "vpermt2ps + vfmadd231ps": (3, 32),
    "vpexpandw + 8 vdpbf16ps": (4, 256),
    "vpshufb + vdpbf16ps": (5, 32),
}

CPP = r"""
#include <torch/extension.h>
#include <chrono>
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,avx2,fma")
// STEP(a, j): one step of mix MIX on chain j; a step of mix 4 is one expand feeding 8 dots (the
// bitmap kernel's 8 rows of x). Eight named accumulators: an array bound to an asm operand went
// through memory and serialised the chains.
template <int MIX>
inline __m512 step(__m512 a, __m512i src, __m512i src2, __m512i idx, __m512 u, __m512bh e) {
  const __m512bh w = (__m512bh)src2;
  if constexpr (MIX == 0) return _mm512_dpbf16_ps(a, (__m512bh)src, w);
  if constexpr (MIX == 1) return _mm512_fmadd_ps(u, u, a);
  if constexpr (MIX == 2)
    return _mm512_dpbf16_ps(a, (__m512bh)_mm512_permutex2var_epi16(src, idx, src2), w);
  if constexpr (MIX == 3)
    return _mm512_fmadd_ps(_mm512_permutex2var_ps(u, idx, _mm512_castsi512_ps(src2)), u, a);
  if constexpr (MIX == 4) return _mm512_dpbf16_ps(a, w, e);
  return _mm512_dpbf16_ps(a, (__m512bh)_mm512_shuffle_epi8(src, idx), w);
}

template <int MIX>
double loop(int64_t iters) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  __m512i src = _mm512_set1_epi16(0x3f80);
  const __m512i src2 = _mm512_set1_epi16(0x3c00);
  // one index per chain: no two steps of an iteration compute the same shuffle
  const __m512i i0 = _mm512_set1_epi16(3), i1 = _mm512_set1_epi16(8), i2 = _mm512_set1_epi16(13),
                i3 = _mm512_set1_epi16(18), i4 = _mm512_set1_epi16(23), i5 = _mm512_set1_epi16(28),
                i6 = _mm512_set1_epi16(33), i7 = _mm512_set1_epi16(38);
  const __m512 u = _mm512_set1_ps(1e-3f);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    __m512bh e = (__m512bh)src;
    if constexpr (MIX == 4)
      e = (__m512bh)_mm512_maskz_expand_epi16(__mmask32(0x5a5a5a5au ^ uint32_t(i)), src);
    a0 = step<MIX>(a0, src, src2, i0, u, e);
    a1 = step<MIX>(a1, src, src2, i1, u, e);
    a2 = step<MIX>(a2, src, src2, i2, u, e);
    a3 = step<MIX>(a3, src, src2, i3, u, e);
    a4 = step<MIX>(a4, src, src2, i4, u, e);
    a5 = step<MIX>(a5, src, src2, i5, u, e);
    a6 = step<MIX>(a6, src, src2, i6, u, e);
    a7 = step<MIX>(a7, src, src2, i7, u, e);
    __asm__ volatile("" : "+v"(src));  // a new value each iteration: nothing is hoisted out of the loop
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float out[16];
  const __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                   _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
  _mm512_storeu_ps(out, sum);
  if (out[0] == 12345.f) return -1.0;  // the accumulators are used
  return (MIX == 4 ? 1.0 : 8.0) * double(iters) / s;
}

// steps per second of mix `mix` over `iters` iterations of 8 independent steps
double mix_rate(int64_t mix, int64_t iters) {
  switch (mix) {
    case 0: return loop<0>(iters);
    case 1: return loop<1>(iters);
    case 2: return loop<2>(iters);
    case 3: return loop<3>(iters);
    case 4: return loop<4>(iters);
    default: return loop<5>(iters);
  }
}
#pragma GCC pop_options
"""


def build():
    """The mixes compiled (torch's inline extension, the system compiler); one per source."""
    from torch.utils.cpp_extension import load_inline

    flags = ["-O2", "-std=c++17"]
    return load_inline("sparsekit_cpu_op_throughput", [CPP], functions=["mix_rate"], extra_cflags=flags)


def measure(iters: int, rounds: int) -> list[dict]:
    """Rows: mix, columns per step, M steps/s median and p20..p80 over interleaved rounds, columns/ns."""
    ext = build()
    for _, (mix, _) in MIXES.items():
        ext.mix_rate(mix, max(1, iters // 10))  # warm: clocks up, code paged in
    rates: dict[str, list[float]] = {name: [] for name in MIXES}
    for turn in range(rounds):
        order = list(MIXES.items()) if turn % 2 == 0 else list(MIXES.items())[::-1]
        for name, (mix, _) in order:
            rates[name].append(ext.mix_rate(mix, iters) / 1e6)
    rows = []
    for name, (_, columns) in MIXES.items():
        values = rates[name]
        # inclusive: p20 and p80 stay within the rounds measured, however few
        quant = statistics.quantiles(values, n=5, method="inclusive") if len(values) > 1 else values * 4
        median = statistics.median(rates[name])
        row = {"mix": name, "columns_per_step": columns, "msteps_per_s": median}
        rows.append({**row, "p20": quant[0], "p80": quant[3], "columns_per_ns": median * columns / 1e3})
    return rows


def markdown(rows: list[dict], header: str) -> str:
    by = {r["mix"]: r for r in rows}
    bf16, fp32 = by["vdpbf16ps"]["columns_per_ns"], by["vfmadd231ps"]["columns_per_ns"]
    lines = [
        "# AVX-512 instruction mixes of the CPU kernels: throughput on one core",
        "",
        f"{header}. One thread; 8 independent chains per loop; rounds interleaved. `x dense` is the "
        "mix's dense columns per ns over dense's of the same dtype (vdpbf16ps for bf16, vfmadd231ps for "
        "fp32): the ceiling of that kernel's inner step against dense's once a layer is compute-bound.",
        "",
        "| mix | M steps/s (p20..p80) | columns / step | columns / ns | x dense |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        dense = fp32 if "vfmadd" in r["mix"] else bf16
        lines.append(
            f"| {r['mix']} | {r['msteps_per_s']:.0f} ({r['p20']:.0f}..{r['p80']:.0f}) | "
            f"{r['columns_per_step']} | {r['columns_per_ns']:.1f} | {r['columns_per_ns'] / dense:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for cpu-op-throughput.{json,md}")
    parser.add_argument("--iters", type=int, default=20_000_000, help="loop iterations per timed call")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median over them)")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.rounds < 1:
        parser.error("--iters and --rounds must be at least 1")
    require_avx512_bf16("the mixes")
    torch.set_num_threads(1)
    rows = measure(args.iters, args.rounds)
    print(write_report(args.out, "cpu-op-throughput", "cpu_op_throughput.py", argv, rows, markdown))


if __name__ == "__main__":
    main()
