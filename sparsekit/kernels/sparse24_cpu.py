"""CPU path of the 2:4 GEMM: a C++ kernel that expands compressed groups in registers.

``sparse24_mm_cpu``: x [..., K] (fp32/bf16/fp16), values [N, K/2], meta [N, ceil(K/8)] uint8,
bias [N] or None -> y [..., N] = x @ decompress_24(values, meta).T + bias, fp32 accumulation.

Decode (M <= ``DIRECT_MAX_M``): one pass over values + meta (0.5625x the dense fp32/bf16 bytes).
With AVX-512 each 64-column step loads 8 meta bytes and 32 values, and builds 4 dense
16-lane vectors with one masked permute each (lane j of group g takes value 0, value 1 or zero
by comparing j with the nibble's i0/i1), FMA'd into per-row accumulators; no dense weight is
ever written. Without AVX-512 the same loop runs scalar (correct, not fast).

Prefill (larger M): decompress ``ROW_BLOCK`` rows at a time into a reused buffer and run the BLAS
GEMM on it, so a dense copy of the whole weight is never held either.

The extension builds once per machine with the system C++ compiler (the same one
torch.compile's CPU backend needs) and is cached by torch under ~/.cache/torch_extensions;
``-march=native`` is keyed into its name. Where it cannot build, a chunked decompress + F.linear
in plain torch takes over (logged once). ``SPARSEKIT_CPU_EXT=0`` forces that fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# largest M for the direct kernel; above it, blocked decompress + BLAS GEMM. Measured on a Zen 5
# (AVX-512) core: fp32 direct wins to M=8; for bf16/fp16 the oneDNN GEMM (AVX512-BF16) wins from
# M=4 on, and the direct kernel still beats blocked there (bench/bench_cpu_decode_24.py).
DIRECT_MAX_M = {torch.float32: 8, torch.bfloat16: 4, torch.float16: 4}
ROW_BLOCK = 256  # rows per decompressed block in the GEMM path: 256 x 4096 fp32 = 4 MiB

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstring>
#include <cstdint>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SK_AVX512 1
#else
#define SK_AVX512 0
#endif

namespace {

constexpr int MB = 8;  // x rows per pass: MB accumulators + temporaries stay in the 32 zmm registers

inline int nibble(const uint8_t* mrow, int64_t g) { return (mrow[g >> 1] >> ((g & 1) * 4)) & 15; }

// one group, scalar: the same select decompress_24_ref does (i0 wins a tie, never produced)
template <typename T>
inline void expand_group(const T* vrow, const uint8_t* mrow, int64_t g, float* w) {
  const int nib = nibble(mrow, g), i0 = nib & 3, i1 = nib >> 2;
  const float v0 = static_cast<float>(vrow[2 * g]), v1 = static_cast<float>(vrow[2 * g + 1]);
  for (int j = 0; j < 4; ++j) w[j] = (j == i0) ? v0 : ((j == i1) ? v1 : 0.f);
}

#if SK_AVX512
template <typename T> inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <> inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <typename T> inline void store16(T* p, __m512 v);
template <> inline void store16<float>(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
template <> inline void store16<c10::BFloat16>(c10::BFloat16* p, __m512 v) {
  // exact: every lane is a bf16 value or zero, so the low 16 bits are zero
  __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}
template <> inline void store16<c10::Half>(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// 64 columns = 16 groups: meta word mw (16 nibbles), values va (groups 0..7), vb (groups 8..15).
// Lane l of dense vector q is column 16q + l: group 4q + l/4, slot j = l%4.
struct Expander {
  __m512i shift, slot, src, one, three;
  Expander() {
    alignas(64) int32_t s[16], j[16], b[16];
    for (int l = 0; l < 16; ++l) { s[l] = 4 * (l / 4); j[l] = l % 4; b[l] = 2 * (l / 4); }
    shift = _mm512_load_si512(s); slot = _mm512_load_si512(j); src = _mm512_load_si512(b);
    one = _mm512_set1_epi32(1); three = _mm512_set1_epi32(3);
  }
  template <int Q>
  inline __m512 dense(uint64_t mw, __m512 va, __m512 vb) const {
    const __m512i nib = _mm512_srlv_epi32(_mm512_set1_epi32(int((mw >> (16 * Q)) & 0xFFFF)), shift);
    const __mmask16 k0 = _mm512_cmpeq_epi32_mask(_mm512_and_si512(nib, three), slot);
    const __mmask16 k1 = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_srli_epi32(nib, 2), three), slot);
    // value index inside va/vb: 2 * (group % 4) + 8 * (Q % 2), +1 where slot j holds value 1
    __m512i idx = _mm512_add_epi32(src, _mm512_set1_epi32(8 * (Q & 1)));
    idx = _mm512_mask_add_epi32(idx, k1 & ~k0, idx, one);
    return _mm512_maskz_permutexvar_ps(k0 | k1, idx, (Q < 2) ? va : vb);
  }
};
#endif

// y[m, n] (+)= sum_k x[m, k] w[n, k] for rows m0..m0+R of x (fp32), one output row n
template <typename T, int R>
inline void row_dot(const T* vrow, const uint8_t* mrow, const float* x, int64_t ldx, int64_t K,
                    float* acc_out) {
  const int64_t G = K / 4;
  int64_t g = 0;
  float acc[R];
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
#if SK_AVX512
  static const Expander E;
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (; g + 16 <= G; g += 16) {
    uint64_t mw;
    std::memcpy(&mw, mrow + g / 2, 8);
    const __m512 va = load16<T>(vrow + 2 * g), vb = load16<T>(vrow + 2 * g + 16);
    const float* xk = x + 4 * g;
    const __m512 w0 = E.dense<0>(mw, va, vb), w1 = E.dense<1>(mw, va, vb);
    const __m512 w2 = E.dense<2>(mw, va, vb), w3 = E.dense<3>(mw, va, vb);
    for (int r = 0; r < R; ++r) {
      const float* xr = xk + r * ldx;
      __m512 s = _mm512_mul_ps(w0, _mm512_loadu_ps(xr));
      s = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), s);
      s = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xr + 32), s);
      a[r] = _mm512_add_ps(a[r], _mm512_fmadd_ps(w3, _mm512_loadu_ps(xr + 48), s));
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(a[r]);
#endif
  for (; g < G; ++g) {
    float w[4];
    expand_group<T>(vrow, mrow, g, w);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + 4 * g;
      acc[r] += w[0] * xr[0] + w[1] * xr[1] + w[2] * xr[2] + w[3] * xr[3];
    }
  }
  for (int r = 0; r < R; ++r) acc_out[r] = acc[r];
}

template <typename T, int R>
void rows_block(const T* v, const uint8_t* meta, const float* x, const T* bias, T* y, int64_t M, int64_t N,
                int64_t K, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t ldv = K / 2, ldm = (K + 7) / 8;
  float acc[R];
  for (int64_t n = n0; n < n1; ++n) {
    row_dot<T, R>(v + n * ldv, meta + n * ldm, x + m0 * K, K, K, acc);
    const float b = bias ? static_cast<float>(bias[n]) : 0.f;
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = static_cast<T>(acc[r] + b);
  }
}

template <typename T>
void mm_impl(const T* v, const uint8_t* meta, const float* x, const T* bias, T* y, int64_t M, int64_t N,
             int64_t K) {
  // grain: enough rows that each task streams >= ~64 KiB of weights
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * int64_t(sizeof(T)) / 2));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      switch (std::min<int64_t>(MB, M - m0)) {
        case 1: rows_block<T, 1>(v, meta, x, bias, y, M, N, K, m0, n0, n1); break;
        case 2: rows_block<T, 2>(v, meta, x, bias, y, M, N, K, m0, n0, n1); break;
        case 3: rows_block<T, 3>(v, meta, x, bias, y, M, N, K, m0, n0, n1); break;
        case 4: rows_block<T, 4>(v, meta, x, bias, y, M, N, K, m0, n0, n1); break;
        case 5: rows_block<T, 5>(v, meta, x, bias, y, M, N, K, m0, n0, n1); break;
        case 6: rows_block<T, 6>(v, meta, x, bias, y, M, N, K, m0, n0, n1); break;
        case 7: rows_block<T, 7>(v, meta, x, bias, y, M, N, K, m0, n0, n1); break;
        default: rows_block<T, 8>(v, meta, x, bias, y, M, N, K, m0, n0, n1); break;
      }
    }
  });
}

template <typename T>
void decompress_impl(const T* v, const uint8_t* meta, T* w, int64_t N, int64_t K) {
  const int64_t ldv = K / 2, ldm = (K + 7) / 8, G = K / 4;
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * int64_t(sizeof(T))));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#if SK_AVX512
    static const Expander E;
#endif
    for (int64_t n = n0; n < n1; ++n) {
      const T* vrow = v + n * ldv;
      const uint8_t* mrow = meta + n * ldm;
      T* wrow = w + n * K;
      int64_t g = 0;
#if SK_AVX512
      for (; g + 16 <= G; g += 16) {
        uint64_t mw;
        std::memcpy(&mw, mrow + g / 2, 8);
        const __m512 va = load16<T>(vrow + 2 * g), vb = load16<T>(vrow + 2 * g + 16);
        store16<T>(wrow + 4 * g, E.dense<0>(mw, va, vb));
        store16<T>(wrow + 4 * g + 16, E.dense<1>(mw, va, vb));
        store16<T>(wrow + 4 * g + 32, E.dense<2>(mw, va, vb));
        store16<T>(wrow + 4 * g + 48, E.dense<3>(mw, va, vb));
      }
#endif
      for (; g < G; ++g) {
        float d[4];
        expand_group<T>(vrow, mrow, g, d);
        for (int j = 0; j < 4; ++j) wrow[4 * g + j] = static_cast<T>(d[j]);
      }
    }
  });
}

template <typename Fn>
void dispatch(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "sparse24 CPU kernel: fp32/bf16/fp16 only, got ", t);
  }
}

}  // namespace

// x [M, K] contiguous, values [N, K/2] and meta [N, ceil(K/8)] contiguous -> y [M, N]
torch::Tensor mm(torch::Tensor x, torch::Tensor values, torch::Tensor meta,
                 c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  auto y = torch::empty({M, N}, x.options());
  auto xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);  // M x K, small at decode
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const float* xp = xf.data_ptr<float>();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    mm_impl<T>(values.data_ptr<T>(), mp, xp, bp, y.data_ptr<T>(), M, N, K);
  });
  return y;
}

// rows [n0, n0 + out.size(0)) of the dense weight into out [rows, K] (contiguous)
void decompress_rows(torch::Tensor values, torch::Tensor meta, int64_t n0, torch::Tensor out) {
  const int64_t rows = out.size(0), K = out.size(1);
  const uint8_t* mp = meta.data_ptr<uint8_t>() + n0 * meta.stride(0);
  dispatch(values.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    decompress_impl<T>(values.data_ptr<T>() + n0 * values.stride(0), mp, out.data_ptr<T>(), rows, K);
  });
}

bool has_avx512() { return SK_AVX512; }
"""

_lock = threading.Lock()
_ext = None
_ext_failed = False


def _cpu_key() -> str:
    """Hash of the CPU flags, so a cache built with -march=native is never reused on another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1((flags + torch.__version__).encode()).hexdigest()[:10]


def extension():
    """The compiled extension, building it on first use; None where it cannot build."""
    global _ext, _ext_failed
    if _ext is not None or _ext_failed:
        return _ext
    if os.environ.get("SPARSEKIT_CPU_EXT", "1") == "0":
        return None
    with _lock:
        if _ext is None and not _ext_failed:
            try:
                from torch.utils.cpp_extension import load_inline

                _ext = load_inline(
                    name=f"sparsekit_sparse24_cpu_{_cpu_key()}",
                    cpp_sources=[_CPP],
                    functions=["mm", "decompress_rows", "has_avx512"],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                )
            except Exception as e:  # no compiler, no ninja, exotic platform: stay correct, lose speed
                _ext_failed = True
                log.warning("sparse24 CPU extension did not build (%s); using chunked torch path", e)
    return _ext


# ----------------------------------------------------------------------------- plain-torch fallback
def decompress_24_torch(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """values [N, K/2], meta [N, ceil(K/8)] -> dense [N, K]: select per slot, no scatter."""
    rows, half = values.shape
    groups = half // 2
    nib = torch.stack((meta & 15, meta >> 4), dim=-1).reshape(rows, -1)[:, :groups]
    i0, i1 = (nib & 3).unsqueeze(-1), (nib >> 2).unsqueeze(-1)
    slot = torch.arange(4, dtype=torch.uint8, device=values.device)
    v = values.reshape(rows, groups, 2)
    zero = values.new_zeros(())
    dense = torch.where(i0 == slot, v[..., :1], torch.where(i1 == slot, v[..., 1:], zero))
    return dense.reshape(rows, 2 * half)


def decompress_rows(
    values: torch.Tensor, meta: torch.Tensor, n0: int, n1: int, out: torch.Tensor | None = None
):
    """Dense rows [n0, n1) of the weight, written into ``out`` [n1 - n0, K] when given."""
    ext = extension()
    values, meta = values.contiguous(), meta.contiguous()
    k = 2 * values.shape[1]
    if out is None:
        out = values.new_empty(n1 - n0, k)
    if ext is not None:
        ext.decompress_rows(values, meta, n0, out)
    else:
        out.copy_(decompress_24_torch(values[n0:n1], meta[n0:n1]))
    return out


def _blocked_mm(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None):
    """y [M, N] via ROW_BLOCK rows of the weight at a time: decompress into a reused buffer, GEMM."""
    m, k = x2.shape
    n = values.shape[0]
    y = x2.new_empty(m, n)
    buf = values.new_empty(min(ROW_BLOCK, n), k)
    for n0 in range(0, n, ROW_BLOCK):
        n1 = min(n0 + ROW_BLOCK, n)
        w = decompress_rows(values, meta, n0, n1, buf[: n1 - n0])
        y[:, n0:n1] = F.linear(x2, w, None if bias is None else bias[n0:n1])
    return y


def sparse24_mm_cpu(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """CPU 2:4 GEMM (inputs already checked by ``sparse24_mm``); never holds the dense weight."""
    n = values.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    values, meta = values.contiguous(), meta.contiguous()
    ext = extension()
    if ext is not None and x2.shape[0] <= DIRECT_MAX_M[x.dtype]:
        y = ext.mm(x2.contiguous(), values, meta, bias.contiguous() if bias is not None else None)
    else:
        y = _blocked_mm(x2, values, meta, bias)
    return y.reshape(*x.shape[:-1], n)


def has_fast_path() -> bool:
    ext = extension()
    return ext is not None and bool(ext.has_avx512())


__all__ = ["sparse24_mm_cpu", "decompress_rows", "decompress_24_torch", "extension", "has_fast_path"]
