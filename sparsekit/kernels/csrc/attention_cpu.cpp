// sparsekit's CPU kernels, part 4 of 5: causal self-attention, bf16 on AVX512_BF16 and fp32 on AVX2.
//
// Calibration forwards run bf16 attention over whole windows (8 x 512 tokens per call). ATen's
// CPU flash kernel takes a 512-token window as one key block, so its causal mask skips nothing:
// it computes every score of the square and masks half of them. Here queries and keys go in
// blocks of BQ x BK and a key block right of a query block's diagonal is never computed, so the
// work is the triangle. Both matmuls run on vdpbf16ps (bf16 products, fp32 sums), the softmax is
// the online one (running row max and sum in fp32), probabilities are rounded to bf16 for the
// P V product, as ATen's bf16 flash kernel does.
//
// causal_attention_bf16(q [B, H, S, D], k [B, KV, S, D], v [B, KV, S, D], scale) -> [B, S, H, D]
//   bf16, any strides with a unit last stride; H a multiple of KV (grouped-query heads share a key
//   head); D in {64, 96, 128, 256}. Row i attends to keys 0..i. The output is in the layout the
//   attention's output projection reads ([B, S, H * D] after a view).

namespace {

constexpr int ATT_BQ = 32;  // query rows per task
constexpr int ATT_BK = 64;  // keys per block (4 vectors of 16 fp32 scores)

bool attention_head_dim_ok(int64_t d) { return d == 64 || d == 96 || d == 128 || d == 256; }

// what both kernels take: q [B, H, S, D], k and v [B, KV, S, D] of ``dtype`` on the CPU, H a
// multiple of KV, D in {64, 96, 128, 256}, unit last strides (``name`` heads every message)
void check_attention_inputs(const char* name, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            at::ScalarType dtype, const char* dtype_name) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, name, ": q, k, v must be [B, H, S, D]");
  TORCH_CHECK(q.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype, name,
              ": q, k, v must be ", dtype_name);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), name, ": CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == KV && k.size(2) == S && v.size(2) == S &&
                  k.size(3) == D && v.size(3) == D,
              name, ": k and v must be [B, KV, S, D] with q's B, S and D");
  TORCH_CHECK(KV > 0 && H % KV == 0, name, ": query heads must be a multiple of key heads");
  TORCH_CHECK(attention_head_dim_ok(D), name, ": head dim must be 64, 96, 128 or 256");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, name, ": unit last stride");
}

}  // namespace

#if SK_X86
SK_BEGIN_AVX512BF16
namespace sk_attention {

// 2^x for x <= 0 (16 lanes): x = n + f, f in [-0.5, 0.5], 2^f by its Taylor series to degree 7
// (relative error about 1e-8), 2^n by scalef; lanes below -126 give 0 (masked scores, -inf)
inline __m512 exp2_nonpositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

inline __m512bh bcast_pair(const uint32_t* word) { return (__m512bh)_mm512_set1_epi32(int32_t(*word)); }

// Packed keys of one (batch, key head): kp[block][d2][j] (uint32: the bf16 pair k[j][2 d2 .. 2 d2 + 1]
// of key jb * BK + j), zero past S. Packed values: vp[j2][d] = (v[2 j2][d], v[2 j2 + 1][d]), zero past S.
void pack_keys(const c10::BFloat16* k, int64_t sk, int64_t S, int64_t D, int64_t Sp, uint32_t* kp) {
  const int64_t D2 = D / 2;
  for (int64_t jb = 0; jb < Sp; jb += ATT_BK)
    for (int64_t d2 = 0; d2 < D2; ++d2) {
      uint32_t* dst = kp + (jb / ATT_BK) * D2 * ATT_BK + d2 * ATT_BK;
      for (int64_t j = 0; j < ATT_BK; ++j) {
        const int64_t row = jb + j;
        uint32_t w = 0;
        if (row < S) std::memcpy(&w, k + row * sk + 2 * d2, 4);
        dst[j] = w;
      }
    }
}

void pack_values(const c10::BFloat16* v, int64_t sv, int64_t S, int64_t D, int64_t Sp, uint32_t* vp) {
  for (int64_t j2 = 0; j2 < Sp / 2; ++j2) {
    const int64_t r0 = 2 * j2, r1 = 2 * j2 + 1;
    for (int64_t d = 0; d < D; ++d) {
      const uint16_t lo = r0 < S ? reinterpret_cast<const uint16_t*>(v + r0 * sv)[d] : 0;
      const uint16_t hi = r1 < S ? reinterpret_cast<const uint16_t*>(v + r1 * sv)[d] : 0;
      vp[j2 * D + d] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

// One task: query rows [i0, i0 + BQ) of one (batch, head) against keys 0 .. i0 + BQ - 1.
// q rows at q + i * sq (bf16, D), out rows at out + i * so (bf16, D). DV = D / 16.
template <int DV>
void query_block(const c10::BFloat16* q, int64_t sq, int64_t S, int64_t i0, const uint32_t* kp,
                 const uint32_t* vp, float scale_log2, c10::BFloat16* out, int64_t so) {
  constexpr int D = DV * 16, D2 = D / 2;
  constexpr int PR = DV <= 4 ? 4 : (DV <= 8 ? 2 : 1);  // rows per P V step: PR * DV accumulators
  alignas(64) float o[ATT_BQ][D];
  alignas(64) float s[ATT_BQ][ATT_BK];
  alignas(64) uint16_t p[ATT_BQ][ATT_BK];
  float m[ATT_BQ], l[ATT_BQ], alpha[ATT_BQ];
  const int64_t rows = std::min<int64_t>(ATT_BQ, S - i0);
  const uint32_t* qw[ATT_BQ];
  for (int r = 0; r < ATT_BQ; ++r) {
    qw[r] = reinterpret_cast<const uint32_t*>(q + std::min<int64_t>(i0 + r, S - 1) * sq);
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  std::memset(o, 0, sizeof(o));
  const int64_t last = i0 + rows - 1;  // the last query row: keys 0 .. last
  for (int64_t jb = 0; jb <= last; jb += ATT_BK) {
    const uint32_t* kb = kp + (jb / ATT_BK) * D2 * ATT_BK;
    // scores, 4 rows x 64 keys at a time, in log2 units
    for (int r0 = 0; r0 < ATT_BQ; r0 += 4) {
      __m512 acc[4][4];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int d2 = 0; d2 < D2; ++d2) {
        const uint32_t* kr = kb + d2 * ATT_BK;
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kr), k1 = (__m512bh)_mm512_loadu_si512(kr + 16);
        const __m512bh k2 = (__m512bh)_mm512_loadu_si512(kr + 32), k3 = (__m512bh)_mm512_loadu_si512(kr + 48);
        for (int r = 0; r < 4; ++r) {
          const __m512bh a = bcast_pair(qw[r0 + r] + d2);
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
          acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, k2);
          acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, k3);
        }
      }
      const __m512 sc = _mm512_set1_ps(scale_log2);
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) _mm512_store_ps(&s[r0 + r][16 * c], _mm512_mul_ps(acc[r][c], sc));
    }
    // causal mask (keys right of the row) and the online softmax, row by row
    const bool diagonal = jb + ATT_BK - 1 > i0;
    for (int r = 0; r < ATT_BQ; ++r) {
      if (diagonal) {
        const int64_t keep = i0 + r - jb + 1;  // keys jb .. i0 + r
        for (int64_t j = std::max<int64_t>(keep, 0); j < ATT_BK; ++j) s[r][j] = -INFINITY;
      }
      __m512 mx = _mm512_max_ps(_mm512_max_ps(_mm512_load_ps(&s[r][0]), _mm512_load_ps(&s[r][16])),
                                _mm512_max_ps(_mm512_load_ps(&s[r][32]), _mm512_load_ps(&s[r][48])));
      const float mnew = std::max(m[r], _mm512_reduce_max_ps(mx));  // finite: key jb <= row always
      alpha[r] = m[r] == -INFINITY ? 0.0f : _mm512_cvtss_f32(exp2_nonpositive(_mm512_set1_ps(m[r] - mnew)));
      m[r] = mnew;
      __m512 sum = _mm512_setzero_ps();
      const __m512 mv = _mm512_set1_ps(mnew);
      for (int c = 0; c < 4; ++c) {
        const __m512 e = exp2_nonpositive(_mm512_sub_ps(_mm512_load_ps(&s[r][16 * c]), mv));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&p[r][16 * c]), (__m256i)_mm512_cvtneps_pbh(e));
      }
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
    }
    // o = alpha o + P V over this block's keys
    const uint32_t* vb = vp + (jb / 2) * D;
    for (int r0 = 0; r0 < ATT_BQ; r0 += PR) {
      __m512 acc[PR][DV];
      for (int r = 0; r < PR; ++r)
        for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int j2 = 0; j2 < ATT_BK / 2; ++j2) {
        const uint32_t* vr = vb + j2 * D;
        __m512bh vv[DV];
        for (int c = 0; c < DV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vr + 16 * c);
        for (int r = 0; r < PR; ++r) {
          const __m512bh a = bcast_pair(reinterpret_cast<const uint32_t*>(&p[r0 + r][2 * j2]));
          for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, vv[c]);
        }
      }
      for (int r = 0; r < PR; ++r) {
        const __m512 al = _mm512_set1_ps(alpha[r0 + r]);
        for (int c = 0; c < DV; ++c) {
          float* dst = &o[r0 + r][16 * c];
          _mm512_store_ps(dst, _mm512_fmadd_ps(_mm512_load_ps(dst), al, acc[r][c]));
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    uint16_t* dst = reinterpret_cast<uint16_t*>(out + (i0 + r) * so);
    for (int c = 0; c < DV; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(&o[r][16 * c]), inv)));
  }
}

}  // namespace sk_attention
SK_END_ISA
#endif

torch::Tensor causal_attention_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  check_attention_inputs("causal_attention_bf16", q, k, v, at::kBFloat16, "bf16");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(isa_supported() >= ISA_AVX512_BF16, "causal_attention_bf16: needs AVX512_BF16 and AVX512_VBMI2");
  auto out = torch::empty({B, S, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || S == 0 || H == 0) return out;
#if SK_X86
  using BF = c10::BFloat16;
  const int64_t Sp = (S + ATT_BK - 1) / ATT_BK * ATT_BK, per = Sp * D;  // uint32 words per packed tensor
  auto packs = torch::empty({B * KV, 2, per}, q.options().dtype(at::kInt));
  uint32_t* pk = reinterpret_cast<uint32_t*>(packs.data_ptr<int32_t>());
  const BF *qp = q.data_ptr<BF>(), *kp = k.data_ptr<BF>(), *vp = v.data_ptr<BF>();
  at::parallel_for(0, B * KV, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t bi = t / KV, g = t % KV;
      sk_attention::pack_keys(kp + bi * k.stride(0) + g * k.stride(1), k.stride(2), S, D, Sp, pk + t * 2 * per);
      sk_attention::pack_values(vp + bi * v.stride(0) + g * v.stride(1), v.stride(2), S, D, Sp, pk + t * 2 * per + per);
    }
  });
  const float scale_log2 = float(scale * 1.4426950408889634);
  const int64_t nq = (S + ATT_BQ - 1) / ATT_BQ, group = H / KV;
  BF* op = out.data_ptr<BF>();
  at::parallel_for(0, B * H * nq, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t qb = t % nq, h = (t / nq) % H, bi = t / (nq * H);
      const int64_t pack = bi * KV + h / group;
      const uint32_t* kpk = pk + pack * 2 * per;
      const BF* qrow = qp + bi * q.stride(0) + h * q.stride(1);
      BF* orow = op + bi * S * H * D + h * D;
      switch (D) {
        case 64: sk_attention::query_block<4>(qrow, q.stride(2), S, qb * ATT_BQ, kpk, kpk + per, scale_log2, orow, H * D); break;
        case 96: sk_attention::query_block<6>(qrow, q.stride(2), S, qb * ATT_BQ, kpk, kpk + per, scale_log2, orow, H * D); break;
        case 128: sk_attention::query_block<8>(qrow, q.stride(2), S, qb * ATT_BQ, kpk, kpk + per, scale_log2, orow, H * D); break;
        default: sk_attention::query_block<16>(qrow, q.stride(2), S, qb * ATT_BQ, kpk, kpk + per, scale_log2, orow, H * D); break;
      }
    }
  });
#endif
  return out;
}

// ------------------------------------------------------------------ fp32, AVX2 + FMA (level >= 1)
//
// The same triangle in fp32, for calibration forwards that run in fp32 (the default on CPUs
// without fast bf16 matmuls: AVX2 ones). ATen's fp32 flash kernel computes the whole square there
// too. Queries go in blocks of ATT_BQ rows, keys in blocks of ATT_BK_F32. Both products run one
// micro-kernel, 6 rows x 16 columns at a time (12 FMA chains): scores as q rows against packed
// keys, P V as probability rows against value rows. The online softmax keeps the running max and
// sum per row. Everything is fp32: only the summation order and exp2's polynomial (relative error
// about 1e-8) differ from SDPA.
//
// causal_attention_f32(q [B, H, S, D], k [B, KV, S, D], v [B, KV, S, D], scale) -> [B, S, H, D]
//   fp32, any strides with a unit last stride; H a multiple of KV; D in {64, 96, 128, 256}.

namespace {
constexpr int ATT_BK_F32 = 64;  // keys per block (8 vectors of 8 fp32 scores)
}  // namespace

#if SK_X86
SK_BEGIN_AVX2
namespace sk_attention_f32 {

// 2^x for x <= 0 (8 lanes), as exp2_nonpositive above: lanes at or below -126 give 0 (masked
// scores, -inf); 2^n built in the exponent field (n >= -126, so never subnormal)
inline __m256 exp2_nonpositive(__m256 x) {
  const __m256 floor = _mm256_set1_ps(-126.0f);
  const __m256 live = _mm256_cmp_ps(x, floor, _CMP_GT_OQ);
  x = _mm256_max_ps(x, floor);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.525273380405984e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Packed keys of one (batch, key head): kp[block][d][j] = k[block * BK + j][d], zero past S.
void pack_keys(const float* k, int64_t sk, int64_t S, int64_t D, int64_t Sp, float* kp) {
  for (int64_t jb = 0; jb < Sp; jb += ATT_BK_F32) {
    float* dst = kp + jb * D;
    for (int64_t j = 0; j < ATT_BK_F32; ++j) {
      const int64_t row = jb + j;
      if (row < S) {
        const float* src = k + row * sk;
        for (int64_t d = 0; d < D; ++d) dst[d * ATT_BK_F32 + j] = src[d];
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d * ATT_BK_F32 + j] = 0.0f;
      }
    }
  }
}

// acc[r][0..1] += a[r][i] * b[i][0..15] for i < n: R rows of a (contiguous) against 16 columns of b
// (rows sb apart). Both products are this one: q against packed keys, probabilities against values.
// R = 6 keeps 12 FMA chains in flight (two FMA pipes, 4-6 cycles each) in 15 of 16 registers.
template <int R>
inline void rows_times_16(const float* const* a, const float* b, int64_t sb, int64_t n, __m256 (&acc)[R][2]) {
  for (int64_t i = 0; i < n; ++i) {
    const __m256 b0 = _mm256_loadu_ps(b + i * sb), b1 = _mm256_loadu_ps(b + i * sb + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a[r] + i);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
}

// scores s[r0 .. r0 + R)[c0 .. c0 + 16) = q rows . packed keys, in log2 units
template <int R>
inline void score_rows(const float* const* qr, const float* kb, int D, int c0, __m256 sc, float (*s)[ATT_BK_F32]) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  rows_times_16<R>(qr, kb + c0, ATT_BK_F32, D, acc);
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(&s[r][c0], _mm256_mul_ps(acc[r][0], sc));
    _mm256_store_ps(&s[r][c0 + 8], _mm256_mul_ps(acc[r][1], sc));
  }
}

// o[r][c0 .. c0 + 16) = alpha[r] o[r] + p rows . value rows (keys of this block)
template <int R, int D>
inline void update_rows(const float* const* pr, const float* vb, int64_t sv, int64_t keys, int c0,
                        const float* alpha, float (*o)[D]) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    const __m256 al = _mm256_set1_ps(alpha[r]);
    acc[r][0] = _mm256_mul_ps(_mm256_load_ps(&o[r][c0]), al);
    acc[r][1] = _mm256_mul_ps(_mm256_load_ps(&o[r][c0 + 8]), al);
  }
  rows_times_16<R>(pr, vb + c0, sv, keys, acc);
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(&o[r][c0], acc[r][0]);
    _mm256_store_ps(&o[r][c0 + 8], acc[r][1]);
  }
}

constexpr int ATT_RS = 6;                        // rows per micro-kernel step
constexpr int ATT_TAIL = ATT_BQ % ATT_RS;        // rows left after the full steps (2)
static_assert(ATT_TAIL == 2, "the tail step is written for 2 rows");

// One task: query rows [i0, i0 + BQ) of one (batch, head) against keys 0 .. i0 + BQ - 1.
// q rows at q + i * sq, value rows at v + j * sv, out rows at out + i * so (fp32, D). DC = D / 32.
template <int DC>
void query_block(const float* q, int64_t sq, int64_t S, int64_t i0, const float* kp, const float* v,
                 int64_t sv, float scale_log2, float* out, int64_t so) {
  constexpr int D = DC * 32, BK = ATT_BK_F32, FULL = ATT_BQ - ATT_TAIL;
  alignas(32) float o[ATT_BQ][D];
  alignas(32) float s[ATT_BQ][BK];  // scores, then probabilities
  float m[ATT_BQ], l[ATT_BQ], alpha[ATT_BQ];
  const int64_t rows = std::min<int64_t>(ATT_BQ, S - i0);
  const float* qr[ATT_BQ];
  const float* pr[ATT_BQ];
  for (int r = 0; r < ATT_BQ; ++r) {
    qr[r] = q + std::min<int64_t>(i0 + r, S - 1) * sq;
    pr[r] = s[r];
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  std::memset(o, 0, sizeof(o));
  const int64_t last = i0 + rows - 1;  // the last query row: keys 0 .. last
  const __m256 sc = _mm256_set1_ps(scale_log2);
  for (int64_t jb = 0; jb <= last; jb += BK) {
    const float* kb = kp + jb * D;
    for (int c0 = 0; c0 < BK; c0 += 16) {
      for (int r0 = 0; r0 < FULL; r0 += ATT_RS) score_rows<ATT_RS>(qr + r0, kb, D, c0, sc, s + r0);
      score_rows<ATT_TAIL>(qr + FULL, kb, D, c0, sc, s + FULL);
    }
    // causal mask (keys right of the row) and the online softmax, row by row
    const bool diagonal = jb + BK - 1 > i0;
    for (int r = 0; r < ATT_BQ; ++r) {
      if (diagonal) {
        const int64_t keep = i0 + r - jb + 1;  // keys jb .. i0 + r
        for (int64_t j = std::max<int64_t>(keep, 0); j < BK; ++j) s[r][j] = -INFINITY;
      }
      __m256 mx = _mm256_load_ps(&s[r][0]);
      for (int c = 1; c < BK / 8; ++c) mx = _mm256_max_ps(mx, _mm256_load_ps(&s[r][8 * c]));
      const float mnew = std::max(m[r], hmax(mx));  // finite: key jb <= row always
      alpha[r] = m[r] == -INFINITY ? 0.0f : std::exp2(m[r] - mnew);
      m[r] = mnew;
      __m256 sum = _mm256_setzero_ps();
      const __m256 mv = _mm256_set1_ps(mnew);
      for (int c = 0; c < BK / 8; ++c) {
        const __m256 e = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(&s[r][8 * c]), mv));
        sum = _mm256_add_ps(sum, e);
        _mm256_store_ps(&s[r][8 * c], e);
      }
      l[r] = l[r] * alpha[r] + sk_avx2::hsum(sum);
    }
    // o = alpha o + P V over this block's keys up to the last row (p is 0 past each row's own)
    const int64_t keys = std::min<int64_t>(BK, last + 1 - jb);
    const float* vb = v + jb * sv;
    for (int c0 = 0; c0 < D; c0 += 16) {
      for (int r0 = 0; r0 < FULL; r0 += ATT_RS)
        update_rows<ATT_RS, D>(pr + r0, vb, sv, keys, c0, alpha + r0, o + r0);
      update_rows<ATT_TAIL, D>(pr + FULL, vb, sv, keys, c0, alpha + FULL, o + FULL);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 inv = _mm256_set1_ps(1.0f / l[r]);
    float* dst = out + (i0 + r) * so;
    for (int c = 0; c < D; c += 8) _mm256_storeu_ps(dst + c, _mm256_mul_ps(_mm256_load_ps(&o[r][c]), inv));
  }
}

}  // namespace sk_attention_f32
SK_END_ISA
#endif

torch::Tensor causal_attention_f32(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  check_attention_inputs("causal_attention_f32", q, k, v, at::kFloat, "fp32");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(isa_supported() >= ISA_AVX2, "causal_attention_f32: needs AVX2 and FMA");
  auto out = torch::empty({B, S, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || S == 0 || H == 0) return out;
#if SK_X86
  const int64_t Sp = (S + ATT_BK_F32 - 1) / ATT_BK_F32 * ATT_BK_F32, per = Sp * D;  // floats per packed key head
  auto packs = torch::empty({B * KV, per}, q.options());
  float* pk = packs.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  at::parallel_for(0, B * KV, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t bi = t / KV, g = t % KV;
      sk_attention_f32::pack_keys(kp + bi * k.stride(0) + g * k.stride(1), k.stride(2), S, D, Sp, pk + t * per);
    }
  });
  const float scale_log2 = float(scale * 1.4426950408889634);
  const int64_t nq = (S + ATT_BQ - 1) / ATT_BQ, group = H / KV;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H * nq, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t qb = t % nq, h = (t / nq) % H, bi = t / (nq * H);
      const int64_t g = h / group;
      const float* kpk = pk + (bi * KV + g) * per;
      const float* vrow = vp + bi * v.stride(0) + g * v.stride(1);
      const float* qrow = qp + bi * q.stride(0) + h * q.stride(1);
      float* orow = op + bi * S * H * D + h * D;
      const int64_t sq = q.stride(2), sv = v.stride(2), i0 = qb * ATT_BQ;
      switch (D) {
        case 64: sk_attention_f32::query_block<2>(qrow, sq, S, i0, kpk, vrow, sv, scale_log2, orow, H * D); break;
        case 96: sk_attention_f32::query_block<3>(qrow, sq, S, i0, kpk, vrow, sv, scale_log2, orow, H * D); break;
        case 128: sk_attention_f32::query_block<4>(qrow, sq, S, i0, kpk, vrow, sv, scale_log2, orow, H * D); break;
        default: sk_attention_f32::query_block<8>(qrow, sq, S, i0, kpk, vrow, sv, scale_log2, orow, H * D); break;
      }
    }
  });
#endif
  return out;
}
