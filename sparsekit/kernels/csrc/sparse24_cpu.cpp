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

constexpr int PF_BYTES = 2048;  // software prefetch distance along the values of a row block
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

#if SK_AVX512
// Decode never builds dense weight vectors: it gathers x instead. 16 values of a row (groups
// g..g+7, two values each) sit at columns 4*group + slot, all inside 32 consecutive columns of x;
// one two-source permute (vpermt2ps) fetches those x entries, one FMA multiplies them by the
// values. The permute indices depend on the meta word alone, so they are computed once per 64
// columns and reused for every row of x.
struct Gather {
  __m512i shift, base, three;
  Gather() {
    alignas(64) int32_t s[16], b[16];
    // lane l: value 2*(l/2) + l%2 of the 8 groups: nibble l/2, bits 2*(l%2)..+1 give its slot
    for (int l = 0; l < 16; ++l) { s[l] = 4 * (l / 2) + 2 * (l % 2); b[l] = 4 * (l / 2); }
    shift = _mm512_load_si512(s); base = _mm512_load_si512(b); three = _mm512_set1_epi32(3);
  }
  // column index (0..31) inside the 32 columns of 8 groups, from their 8 nibbles (32 bits)
  inline __m512i index(uint32_t nibbles) const {
    const __m512i slot = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(nibbles)), shift), three);
    return _mm512_add_epi32(base, slot);
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
  static const Gather X;
  __m512 a[R], b[R];  // two independent FMA chains per row (first and second 32 columns)
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
  for (; g + 16 <= G; g += 16) {
    // the weight streams from DRAM once per token: ask for it PF_BYTES ahead (past the row's end
    // this is the next row, stored right after it)
    const char* vnext = reinterpret_cast<const char*>(vrow + 2 * g) + PF_BYTES;
    _mm_prefetch(vnext, _MM_HINT_T0);
    if (sizeof(T) == 4) _mm_prefetch(vnext + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(mrow + g / 2) + PF_BYTES / 8, _MM_HINT_T0);
    uint64_t mw;
    std::memcpy(&mw, mrow + g / 2, 8);
    const __m512i ia = X.index(uint32_t(mw)), ib = X.index(uint32_t(mw >> 32));
    const __m512 va = load16<T>(vrow + 2 * g), vb = load16<T>(vrow + 2 * g + 16);
    const float* xk = x + 4 * g;
    for (int r = 0; r < R; ++r) {
      const float* xr = xk + r * ldx;
      const __m512 xa = _mm512_permutex2var_ps(_mm512_loadu_ps(xr), ia, _mm512_loadu_ps(xr + 16));
      const __m512 xb = _mm512_permutex2var_ps(_mm512_loadu_ps(xr + 32), ib, _mm512_loadu_ps(xr + 48));
      a[r] = _mm512_fmadd_ps(va, xa, a[r]);
      b[r] = _mm512_fmadd_ps(vb, xb, b[r]);
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
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
  // tiles of NT weight rows (~32 KiB of values): with M > MB every pass of MB rows of x re-reads
  // the tile from L1/L2, so the weight streams from DRAM once whatever M is
  const int64_t NT = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, K * int64_t(sizeof(T)) / 2));
  at::parallel_for(0, N, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t n0 = c0; n0 < c1; n0 += NT) {
      const int64_t n1 = std::min<int64_t>(c1, n0 + NT);
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
