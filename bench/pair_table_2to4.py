"""A prototype 2:4 bf16 kernel for compute-bound M (a table of x pairs), against dense and the current kernel.

    python bench/pair_table_2to4.py --out docs/data/pair-table-2to4 --shapes smollm2,llama-2-7b --ms 64,512

Why: ``bench/cpu_op_throughput.py`` shows the 2:4 bf16 kernel's step (``vpermt2w`` + ``vdpbf16ps``,
64 columns) covering 0.81x the columns per ns of dense's ``vdpbf16ps`` on Zen 4: once a layer is
compute-bound (M >= 64 in bf16) it cannot pass dense. This prototype removes the permute. For a
block of 16 * H rows of x it builds, per group of four columns g and each of the six pairs of
slots p a group can keep, T[g][p] = the 16 * H rows' (x[:, 4g + a_p], x[:, 4g + b_p]) as bf16
pairs (six ``vpermt2w`` per group and 16 rows, paid once for every weight row). A weight row's
group then costs one broadcast of its two values and H steps of one load of T[g][p] + one
``vdpbf16ps``: 16 rows x 2 kept values, 64 dense columns per step, no permute. Groups are taken C
at a time so that T stays in cache, with the accumulators of every weight row kept in a tile
between chunks. It is not wired into ``SparseLinear``: this script measures whether it is worth
doing (correctness is checked against ``F.linear`` here and in its test).

Needs a CPU with ``avx512-bf16`` (AVX-512 + AVX512_BF16 + VBMI2) and K a multiple of 8.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bf16dot_report import require_avx512_bf16, write_report

from sparsekit.bench.layers import linear_shapes
from sparsekit.bench.timing import time_cpu_interleaved
from sparsekit.kernels import compress_24, nm_keep_mask
from sparsekit.kernels.sparse24_cpu import sparse24_mm_cpu

CONFIGS = ((4, 16), (4, 32), (2, 64))  # (H: rows of x per block / 16, C: groups per chunk)

CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,avx2,fma,bmi,bmi2")
using BF = c10::BFloat16;
namespace {
// the six pairs of kept slots (a < b) a group can hold; nibble a | b << 2 -> pair index
constexpr int PA[6] = {0, 0, 0, 1, 1, 2}, PB[6] = {1, 2, 3, 2, 3, 3};
struct PairOf {
  uint16_t two[256];  // meta byte (groups 2i, 2i + 1) -> their pair indices, one per byte
  PairOf() {
    int8_t p[16] = {0};
    for (int q = 0; q < 6; ++q) p[PA[q] | (PB[q] << 2)] = int8_t(q);
    for (int b = 0; b < 256; ++b) two[b] = uint16_t(p[b & 15] | (p[b >> 4] << 8));
  }
};
const PairOf PAIR_OF;

// T[(g - g0) * 6 + p][r] (r < 16 H) = (x[m0 + r, 4g + PA[p]], x[m0 + r, 4g + PB[p]]) as one uint32,
// for groups [g0, g0 + C); rows at or past M read as zero. xt: scratch [C][16 H] of 64 bits.
template <int H>
void build(const BF* x, int64_t M, int64_t K, int64_t m0, int64_t g0, int64_t C, uint32_t* T, uint64_t* xt) {
  constexpr int R = 16 * H;
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    for (int64_t g = 0; g < C; ++g) {
      uint64_t four = 0;  // the group's 4 columns of this row
      if (m < M) std::memcpy(&four, x + m * K + 4 * (g0 + g), 8);
      xt[g * R + r] = four;
    }
  }
  alignas(64) int16_t idx[6][32];  // word 2r / 2r + 1 of the result: row r's slot a / b (4 words a row)
  for (int p = 0; p < 6; ++p)
    for (int r = 0; r < 16; ++r) {
      idx[p][2 * r] = int16_t(4 * r + PA[p]);
      idx[p][2 * r + 1] = int16_t(4 * r + PB[p]);
    }
  __m512i I[6];
  for (int p = 0; p < 6; ++p) I[p] = _mm512_load_si512(idx[p]);
  for (int64_t g = 0; g < C; ++g)
    for (int h = 0; h < H; ++h) {
      const uint64_t* rows16 = xt + g * R + 16 * h;
      const __m512i lo = _mm512_loadu_si512(rows16), hi = _mm512_loadu_si512(rows16 + 8);
      for (int p = 0; p < 6; ++p)
        _mm512_store_si512(T + ((g * 6 + p) * R + 16 * h), _mm512_permutex2var_epi16(lo, I[p], hi));
    }
}

// weight rows [n0, n1) x groups [g0, g0 + C) (even) against T into the tile O [n1 - n0 (+ NB)][16 H] fp32
template <int H, int NB>
void rows(const BF* v, const uint8_t* meta, int64_t K, int64_t n0, int64_t n1, int64_t g0, int64_t C,
          const uint32_t* T, float* O, bool first) {
  constexpr int R = 16 * H;
  const int64_t ldv = K / 2, ldm = K / 8;
  for (int64_t n = n0; n < n1; n += NB) {
    const int nr = int(std::min<int64_t>(NB, n1 - n));
    __m512 a[NB][H];
    float* o = O + (n - n0) * R;
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < H; ++h) a[j][h] = first ? _mm512_setzero_ps() : _mm512_load_ps(o + j * R + 16 * h);
    const uint32_t* vr[NB];
    const uint8_t* mr[NB];
    for (int j = 0; j < NB; ++j) {
      const int64_t row = n + (j < nr ? j : 0);  // past the end: row n again, its tile rows unused
      vr[j] = reinterpret_cast<const uint32_t*>(v + row * ldv) + g0;
      mr[j] = meta + row * ldm + g0 / 2;
    }
    for (int64_t g = 0; g < C; g += 2) {
      const uint32_t* tg = T + g * 6 * R;
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        const uint32_t q = PAIR_OF.two[mr[j][g >> 1]];
        const uint32_t* t0 = tg + (q & 0xff) * R;
        const uint32_t* t1 = tg + 6 * R + (q >> 8) * R;
        const __m512bh w0 = (__m512bh)_mm512_set1_epi32(int(vr[j][g]));
        const __m512bh w1 = (__m512bh)_mm512_set1_epi32(int(vr[j][g + 1]));
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h)
          a[j][h] = _mm512_dpbf16_ps(a[j][h], w0, (__m512bh)_mm512_load_si512(t0 + 16 * h));
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h)
          a[j][h] = _mm512_dpbf16_ps(a[j][h], w1, (__m512bh)_mm512_load_si512(t1 + 16 * h));
      }
    }
    for (int j = 0; j < NB; ++j)  // all NB rows (the tile has room): a runtime bound kept a[] in memory
      for (int h = 0; h < H; ++h) _mm512_store_ps(o + j * R + 16 * h, a[j][h]);
  }
}

template <int H>
void block(const BF* x, const BF* v, const uint8_t* meta, int64_t M, int64_t K, int64_t N, int64_t m0,
           int64_t n0, int64_t n1, int64_t C, uint32_t* T, uint64_t* xt, float* O, BF* y) {
  constexpr int NB = H == 4 ? 3 : (H == 2 ? 6 : 8), R = 16 * H;
  const int64_t G = K / 4;
  for (int64_t g0 = 0; g0 < G; g0 += C) {
    const int64_t c = std::min<int64_t>(C, G - g0);
    build<H>(x, M, K, m0, g0, c, T, xt);
    rows<H, NB>(v, meta, K, n0, n1, g0, c, T, O, g0 == 0);
  }
  for (int64_t r = 0; r < std::min<int64_t>(R, M - m0); ++r)
    for (int64_t n = n0; n < n1; ++n) y[(m0 + r) * N + n] = BF(O[(n - n0) * R + r]);
}

template <typename P>
P* aligned64(std::vector<char>& buf, size_t bytes) {
  buf.resize(bytes + 64);
  return reinterpret_cast<P*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}
}  // namespace

// x [M, K] bf16, values [N, K / 2] bf16, meta [N, K / 8] uint8 (K % 8 == 0, C even) -> y [M, N] bf16.
// Each thread takes a slice of the weight rows and builds its own tables.
torch::Tensor mm24_pairs(torch::Tensor x, torch::Tensor values, torch::Tensor meta, int64_t H, int64_t C) {
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0), R = 16 * H;
  auto y = torch::empty({M, N}, x.options());
  const BF* xp = x.data_ptr<BF>();
  const BF* vp = values.data_ptr<BF>();
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  BF* yp = y.data_ptr<BF>();
  const int64_t threads = at::get_num_threads(), per = (N + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * per, n1 = std::min<int64_t>(N, n0 + per);
      if (n0 >= n1) continue;
      std::vector<char> tb, xb, ob;
      uint32_t* T = aligned64<uint32_t>(tb, size_t(C) * 6 * R * 4);
      uint64_t* xt = aligned64<uint64_t>(xb, size_t(C) * R * 8);
      float* O = aligned64<float>(ob, size_t(n1 - n0 + 8) * R * 4);
      for (int64_t m0 = 0; m0 < M; m0 += R) {
        if (H == 1) block<1>(xp, vp, mp, M, K, N, m0, n0, n1, C, T, xt, O, yp);
        else if (H == 2) block<2>(xp, vp, mp, M, K, N, m0, n0, n1, C, T, xt, O, yp);
        else block<4>(xp, vp, mp, M, K, N, m0, n0, n1, C, T, xt, O, yp);
      }
    }
  });
  return y;
}
#pragma GCC pop_options
"""


def build():
    """The prototype compiled (torch's inline extension, the system compiler)."""
    from torch.utils.cpp_extension import load_inline

    flags = ["-O3", "-std=c++17"]
    return load_inline("sparsekit_pair_table_2to4", [CPP], functions=["mm24_pairs"], extra_cflags=flags)


def check_args(x: torch.Tensor, h: int, c: int) -> None:
    """What the prototype assumes, checked before it indexes anything."""
    if x.shape[1] % 8:
        raise ValueError(f"K = {x.shape[1]} must be a multiple of 8 (groups are read two at a time)")
    if h not in (1, 2, 4) or c < 2 or c % 2:
        raise ValueError(f"H must be 1, 2 or 4 and C an even number >= 2, got H={h}, C={c}")


def pair_table_mm(
    ext, x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, h: int, c: int
) -> torch.Tensor:
    """y [M, N] bf16 = x [M, K] bf16 @ decompress_24(values, meta).T by the prototype."""
    check_args(x, h, c)
    return ext.mm24_pairs(x.contiguous(), values.contiguous(), meta.contiguous(), h, c)


def sparse_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A random 2:4 weight [n, k] in bf16 (the two largest of every four kept)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return (w * nm_keep_mask(w, 2, 4)).bfloat16()


def cell_variants(ext, x: torch.Tensor, w: torch.Tensor, values, meta, configs, label: str) -> dict:
    """The variants of one cell: dense, the current 2:4 kernel, and the prototype per (H, C), each
    checked against ``F.linear`` in fp32 first (a wrong prototype is never timed); ``values``,
    ``meta``: ``compress_24(w)``."""
    ref = F.linear(x.float(), w.float())
    fns = {"dense": lambda: F.linear(x, w), "2:4 kernel": lambda: sparse24_mm_cpu(x, values, meta, None)}
    for h, c in configs:
        y = pair_table_mm(ext, x, values, meta, h, c).float()
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        if err > 1e-2:
            raise RuntimeError(f"pair table H={h} C={c} is wrong on {label}: error {err:.2e}")
        fns[f"pairs H={h} C={c}"] = lambda h=h, c=c: pair_table_mm(ext, x, values, meta, h, c)
    return fns


def measure(ext, shapes, ms: list[int], configs, min_time: float) -> list[dict]:
    """Rows: per shape, M and variant, the interleaved timing and its speedup over dense."""
    rows = []
    for shape in shapes:
        w = sparse_weight(shape.n, shape.k)
        values, meta = compress_24(w)
        for m in ms:
            x = torch.randn(m, shape.k, generator=torch.Generator().manual_seed(m)).bfloat16()
            fns = cell_variants(ext, x, w, values, meta, configs, f"{shape.layers} M={m}")
            timings = time_cpu_interleaved(fns, min_time_s=min_time)
            dense = timings["dense"].median_ms
            cell = {"model": shape.model, "layers": shape.layers, "n": shape.n, "k": shape.k, "m": m}
            for name, t in timings.items():
                rows.append({**cell, "variant": name, **t.to_dict(), "x_dense": dense / t.median_ms})
    return rows


def markdown(rows: list[dict], header: str) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cells = list(dict.fromkeys((r["model"], r["layers"], r["n"], r["k"], r["m"]) for r in rows))
    by = {(r["model"], r["layers"], r["n"], r["k"], r["m"], r["variant"]): r for r in rows}
    lines = [
        "# A 2:4 bf16 kernel from a table of x pairs (prototype) against dense and the current kernel",
        "",
        f"{header}. Weights cache-warm (one copy), variants of a cell interleaved; each cell: median ms "
        "(p20..p80) and x dense.",
        "",
        "| shape | M | " + " | ".join(variants) + " |",
        "|---|---:|" + "---:|" * len(variants),
    ]
    for cell in cells:
        parts = []
        for v in variants:
            r = by[(*cell, v)]
            parts.append(f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}..{r['p80_ms']:.3f}) {r['x_dense']:.2f}x")
        lines.append(
            f"| {cell[0]} {cell[1]} [{cell[2]}, {cell[3]}] | {cell[4]} | " + " | ".join(parts) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for pair-table-2to4.{json,md}")
    parser.add_argument("--shapes", default="smollm2", help="shipped shape configs, comma-separated")
    parser.add_argument("--ms", default="64,512", help="rows of x, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per variant and cell")
    args = parser.parse_args(argv)
    ms = [int(m) for m in args.ms.split(",")]
    if min(ms) < 1 or args.threads < 1:
        parser.error("--ms and --threads must be at least 1")
    shapes = [s for name in args.shapes.split(",") for s in linear_shapes(name)]
    require_avx512_bf16("the prototype's instructions")
    torch.set_num_threads(args.threads)
    rows = measure(build(), shapes, ms, CONFIGS, args.min_time)
    print(write_report(args.out, "pair-table-2to4", "pair_table_2to4.py", argv, rows, markdown))


if __name__ == "__main__":
    main()
