// sparsekit's CPU kernels, part 3 of 5: bitmap (compiled after sparse24_cpu.cpp, in one unit).
//
// Format: values [nnz] (the kept weights, row-major), mask_bits [N, ceil(K/8)] uint8 (bit j of
// byte c / 8 is column c, LSB first, 1 = kept), offsets [N, ceil(K/64)] int32 (index in values of
// the first kept weight of each 64-column tile). A row's values are contiguous and start at
// offsets[n, 0]; the kernels walk a row's mask and advance by popcounts, so one offset per row
// is read (the others serve the GPU kernel's tiles).
//
// Direct path: expands the weight in registers, once per weight row and step, and multiplies it
// with every row of x:
//   AVX-512: one expand-load (vexpandps; bf16/fp16: a masked load of popcount elements, converted,
//            then vexpandps) gives the 16 dense lanes of 16 columns from 16 mask bits.
//   AVX2:    a 256-entry table of vpermps indices and lane masks per mask byte places 8 loaded
//            values in their columns and zeroes the rest: 8 columns per step (bf16: one vpshufb
//            of the 16 loaded bytes places, widens and zeroes at once).
//   scalar:  walks the set bits.
//   AVX-512 + BF16 (bf16 only): one expand (vpexpandw) of popcount values gives the 32 dense bf16
//            lanes of 32 columns, and one vdpbf16ps per row of x multiplies them with x's 32
//            columns as they are: no conversion of weight or x, 32 columns per instruction.
// Loads never reach past the end of values: AVX-512 loads are masked to the popcount, AVX2
// loads of 8 fall back to a scalar copy within 8 elements of the end.

namespace {

// mask bits of columns [c, c + width) of one row (width <= 32), zero above width
inline uint32_t mask_bits_at(const uint8_t* mrow, int64_t c, int width) {
  uint32_t m = 0;
  std::memcpy(&m, mrow + c / 8, (width + 7) / 8);
  return width >= 32 ? m : (m & ((1u << width) - 1));
}

// columns [c0, K) of one weight row against R rows of x (scalar walk of the set bits)
template <typename T, int R>
inline const T* dot_bitmap_tail(const uint8_t* mrow, const T* p, const float* x, int64_t ldx, int64_t c0, int64_t K,
                                float* acc) {
  for (int64_t c = c0; c < K; c += 8) {
    uint32_t bits = mask_bits_at(mrow, c, int(std::min<int64_t>(8, K - c)));
    while (bits) {
      const int j = __builtin_ctz(bits);
      bits &= bits - 1;
      const float w = static_cast<float>(*p++);
      for (int r = 0; r < R; ++r) acc[r] += w * x[r * ldx + c + j];
    }
  }
  return p;
}

// columns [c0, K) of one weight row written dense (c0 % 8 == 0): zeros, then the set bits
template <typename T>
inline const T* decompress_bitmap_tail(const uint8_t* mrow, const T* p, int64_t c0, int64_t K, T* wrow) {
  std::fill(wrow + c0, wrow + K, static_cast<T>(0.f));
  for (int64_t c = c0; c < K; c += 8) {
    uint32_t bits = mask_bits_at(mrow, c, int(std::min<int64_t>(8, K - c)));
    while (bits) {
      wrow[c + __builtin_ctz(bits)] = *p++;
      bits &= bits - 1;
    }
  }
  return p;
}

template <typename T>
struct BitmapBase {
  const T* v;
  const uint8_t* mask;
  const int32_t* offsets;
  int64_t nnz, K;
  int64_t ldm() const { return (K + 7) / 8; }
  int64_t ldo() const { return (K + 63) / 64; }
  const T* row_values(int64_t n) const { return v + offsets[n * ldo()]; }
  const T* end() const { return v + nnz; }
  double row_bytes() const { return double(nnz) / std::max<int64_t>(1, N) * sizeof(T) + ldm() + 4.0 * ldo(); }
  int64_t N;
};

namespace sk_scalar {
template <typename T>
struct Bitmap : BitmapBase<T> {
  static constexpr int MB = 8;
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    dot_bitmap_tail<T, R>(this->mask + n * this->ldm(), this->row_values(n), x, ldx, 0, this->K, acc);
  }
  void decompress(int64_t n0, int64_t n1, T* out) const {
    for (int64_t n = n0; n < n1; ++n)
      decompress_bitmap_tail<T>(this->mask + n * this->ldm(), this->row_values(n), 0, this->K, out + (n - n0) * this->K);
  }
};
}  // namespace sk_scalar

#if SK_X86
SK_BEGIN_AVX2
namespace sk_avx2 {
// per mask byte: vpermps indices placing the byte's values (consecutive in memory) in their lanes,
// and the lanes it keeps (all ones) or zeroes; one 64-byte entry, read with two aligned loads
struct ExpandTable {
  struct alignas(64) Entry {
    int32_t idx[8];
    int32_t keep[8];
  };
  Entry e[256];
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        e[b].keep[j] = (b >> j) & 1 ? -1 : 0;
        e[b].idx[j] = (b >> j) & 1 ? rank++ : 0;
      }
    }
  }
  // the 8 dense lanes of one mask byte from the values at p (8 readable elements)
  inline __m256 dense(uint32_t byte, __m256 values) const {
    const __m256i i = _mm256_load_si256(reinterpret_cast<const __m256i*>(e[byte].idx));
    const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(e[byte].keep));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(values, i), keep);
  }
};

// bf16: the byte's 8 values are 16 bytes, so one in-lane vpshufb of them (loaded into both 128-bit
// lanes) both places them and widens them to fp32 (bf16 bits in the high half, zero below) and
// zeroes the dropped lanes (control byte 0x80): 3 instructions per 8 columns instead of the fp32
// path's widening, permute and mask
struct ExpandTableBf16 {
  alignas(32) int8_t ctl[256][32];
  ExpandTableBf16() {
    for (int b = 0; b < 256; ++b) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        int8_t* lane = ctl[b] + 4 * j;  // lanes 0-3 in the low 128 bits, 4-7 in the high: bytes 16 + 4 (j - 4)
        lane[0] = lane[1] = int8_t(0x80);
        const bool kept = (b >> j) & 1;
        lane[2] = kept ? int8_t(2 * rank) : int8_t(0x80);
        lane[3] = kept ? int8_t(2 * rank + 1) : int8_t(0x80);
        rank += kept;
      }
    }
  }
  inline __m256 dense(uint32_t byte, __m128i values) const {
    const __m256i both = _mm256_broadcastsi128_si256(values);
    const __m256i c = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctl[byte]));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(both, c));
  }
};

// 8 values from p; within 8 elements of the end of values, a zero-padded copy (never reads past it)
template <typename T>
inline __m256 load8_safe(const T* p, const T* end) {
  if (p + 8 <= end) return load8<T>(p);
  alignas(32) float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < 8 && p + i < end; ++i) t[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(t);
}
inline __m128i load8_bits_safe(const c10::BFloat16* p, const c10::BFloat16* end) {
  if (p + 8 <= end) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < 8 && p + i < end; ++i) std::memcpy(t + i, p + i, 2);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(t));
}

// the 8 dense fp32 lanes of one mask byte from the values at p
// (unchecked: p + 8 <= end, known by the caller)
template <typename T>
struct Expand {
  const ExpandTable& E;
  inline __m256 operator()(uint32_t byte, const T* p, const T* end) const { return E.dense(byte, load8_safe<T>(p, end)); }
  inline __m256 unchecked(uint32_t byte, const T* p) const { return E.dense(byte, load8<T>(p)); }
};
template <>
struct Expand<c10::BFloat16> {
  const ExpandTableBf16& E;
  inline __m256 operator()(uint32_t byte, const c10::BFloat16* p, const c10::BFloat16* end) const {
    return E.dense(byte, load8_bits_safe(p, end));
  }
  inline __m256 unchecked(uint32_t byte, const c10::BFloat16* p) const {
    return E.dense(byte, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
template <typename T>
inline Expand<T> expander() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    static const ExpandTableBf16 E;
    return Expand<T>{E};
  } else {
    static const ExpandTable E;
    return Expand<T>{E};
  }
}

template <typename T>
struct Bitmap : BitmapBase<T> {
  static constexpr int MB = 4;  // 2 accumulators per row of x + 2 weight vectors of 16
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    const Expand<T> dense8 = expander<T>();
    const uint8_t* mrow = this->mask + n * this->ldm();
    const T* p = this->row_values(n);
    const T* end = this->end();
    const int64_t K = this->K;
    __m256 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
    int64_t c = 0;
    // 32 columns: 4 mask bytes read as one word; their values (at most 32) lie before end, so the
    // loads go unchecked (the step is instruction-bound: a check per byte cost 12% at M = 1)
    for (; c + 32 <= K && p + 32 <= end; c += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(p) + PF_BYTES, _MM_HINT_T0);
      uint32_t mw;
      std::memcpy(&mw, mrow + c / 8, 4);
      for (int q = 0; q < 4; ++q) {
        const uint32_t m = (mw >> (8 * q)) & 0xFF;
        const __m256 w = dense8.unchecked(m, p);
        p += _mm_popcnt_u32(m);
        for (int r = 0; r < R; ++r) {
          __m256& s = (q & 1) ? b[r] : a[r];
          s = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * ldx + c + 8 * q), s);
        }
      }
    }
    for (; c + 16 <= K; c += 16) {  // 16 columns: 2 mask bytes, near the end of values
      const uint32_t m0 = mrow[c / 8], m1 = mrow[c / 8 + 1];
      const __m256 w0 = dense8(m0, p, end);
      p += _mm_popcnt_u32(m0);
      const __m256 w1 = dense8(m1, p, end);
      p += _mm_popcnt_u32(m1);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ldx + c), a[r]);
        b[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * ldx + c + 8), b[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = hsum(_mm256_add_ps(a[r], b[r]));
    dot_bitmap_tail<T, R>(mrow, p, x, ldx, c, K, acc);
  }
  void decompress(int64_t n0, int64_t n1, T* out) const {
    const Expand<T> dense8 = expander<T>();
    const T* end = this->end();
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* mrow = this->mask + n * this->ldm();
      const T* p = this->row_values(n);
      T* wrow = out + (n - n0) * this->K;
      int64_t c = 0;
      for (; c + 8 <= this->K; c += 8) {
        const uint32_t m = mrow[c / 8];
        store8<T>(wrow + c, dense8(m, p, end));
        p += _mm_popcnt_u32(m);
      }
      decompress_bitmap_tail<T>(mrow, p, c, this->K, wrow);
    }
  }
};
}  // namespace sk_avx2
SK_END_ISA

SK_BEGIN_AVX512
namespace sk_avx512 {
// the 16 dense lanes of 16 columns with mask bits m, from the values at p (popcount(m) are read)
template <typename T>
inline __m512 expand16(uint32_t m, const T* p) {
  return _mm512_maskz_expand_ps(__mmask16(m), load16_first<T>(p, _mm_popcnt_u32(m)));
}
template <>
inline __m512 expand16<float>(uint32_t m, const float* p) {
  return _mm512_maskz_expandloadu_ps(__mmask16(m), p);
}

template <typename T>
struct Bitmap : BitmapBase<T> {
  static constexpr int MB = 8;  // 16 accumulators + 2 weight vectors
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    const uint8_t* mrow = this->mask + n * this->ldm();
    const T* p = this->row_values(n);
    const int64_t K = this->K;
    __m512 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= K; c += 32) {  // 32 columns: 4 mask bytes
      _mm_prefetch(reinterpret_cast<const char*>(p) + PF_BYTES, _MM_HINT_T0);
      uint32_t m;
      std::memcpy(&m, mrow + c / 8, 4);
      const __m512 w0 = expand16<T>(m & 0xFFFF, p);
      p += _mm_popcnt_u32(m & 0xFFFF);
      const __m512 w1 = expand16<T>(m >> 16, p);
      p += _mm_popcnt_u32(m >> 16);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * ldx + c), a[r]);
        b[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * ldx + c + 16), b[r]);
      }
    }
    for (; c < K; c += 16) {  // the last 1..31 columns: x loads masked to the row
      const int width = int(std::min<int64_t>(16, K - c));
      const uint32_t m = mask_bits_at(mrow, c, width);
      const __m512 w = expand16<T>(m, p);
      p += _mm_popcnt_u32(m);
      const __mmask16 inside = __mmask16(_bzhi_u32(0xFFFFu, width));
      for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(inside, x + r * ldx + c), a[r]);
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
  }
  void decompress(int64_t n0, int64_t n1, T* out) const {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* mrow = this->mask + n * this->ldm();
      const T* p = this->row_values(n);
      T* wrow = out + (n - n0) * this->K;
      int64_t c = 0;
      for (; c + 16 <= this->K; c += 16) {
        uint16_t m;
        std::memcpy(&m, mrow + c / 8, 2);
        store16<T>(wrow + c, expand16<T>(m, p));
        p += _mm_popcnt_u32(m);
      }
      decompress_bitmap_tail<T>(mrow, p, c, this->K, wrow);
    }
  }
};
}  // namespace sk_avx512
SK_END_ISA

SK_BEGIN_AVX512BF16
namespace sk_avx512bf16 {
// bf16 values, bf16 x: dot<NB, R> runs NB weight rows against R rows of x, each x load serving NB
// rows (products exact, sums in fp32, subnormal inputs read as zero, as every AVX512_BF16 op does)
struct BitmapDot : BitmapBase<c10::BFloat16> {
  using BF = c10::BFloat16;
  static constexpr int NB = 2, MB = 8;  // 16 accumulators + 2 weight vectors + x
  // the 32 dense lanes of 32 columns with mask bits m (zero above the row's end): popcount(m)
  // values read, never past them
  static inline __m512bh expand32(uint32_t m, const BF* p) {
    const __m512i v = _mm512_maskz_loadu_epi16(__mmask32(_bzhi_u32(0xFFFFFFFFu, _mm_popcnt_u32(m))), p);
    return (__m512bh)_mm512_maskz_expand_epi16(__mmask32(m), v);
  }
  template <int NR, int R>
  void dot(int64_t n, const BF* x, int64_t ldx, float (*acc)[R]) const {
    const uint8_t* mrow[NR];
    const BF* p[NR];
    for (int j = 0; j < NR; ++j) {
      mrow[j] = mask + (n + j) * ldm();
      p[j] = row_values(n + j);
    }
    __m512 a[NR][R];
    for (int j = 0; j < NR; ++j)
      for (int r = 0; r < R; ++r) a[j][r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= K; c += 32) {  // 32 columns: 4 mask bytes per row
      __m512bh w[NR];
      for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(p[j]) + PF_BYTES, _MM_HINT_T0);
        uint32_t m;
        std::memcpy(&m, mrow[j] + c / 8, 4);
        w[j] = expand32(m, p[j]);
        p[j] += _mm_popcnt_u32(m);
      }
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * ldx + c);
        for (int j = 0; j < NR; ++j) a[j][r] = _mm512_dpbf16_ps(a[j][r], xv, w[j]);
      }
    }
    if (c < K) {  // the last 1..31 columns: x loads masked to the row
      const int width = int(K - c);
      __m512bh w[NR];
      for (int j = 0; j < NR; ++j) w[j] = expand32(mask_bits_at(mrow[j], c, width), p[j]);
      const __mmask32 inside = __mmask32(_bzhi_u32(0xFFFFFFFFu, width));
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(inside, x + r * ldx + c);
        for (int j = 0; j < NR; ++j) a[j][r] = _mm512_dpbf16_ps(a[j][r], xv, w[j]);
      }
    }
    for (int j = 0; j < NR; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_reduce_add_ps(a[j][r]);
  }
};
}  // namespace sk_avx512bf16
SK_END_ISA
#endif  // SK_X86

template <typename T, typename Fn>
auto with_bitmap(int64_t isa, const torch::Tensor& values, const torch::Tensor& mask, const torch::Tensor& offsets,
                 int64_t K, Fn&& fn) {
  const BitmapBase<T> base{values.data_ptr<T>(), mask.data_ptr<uint8_t>(), offsets.data_ptr<int32_t>(),
                           values.numel(), K, mask.size(0)};
#if SK_X86
  if (isa == ISA_AVX512) return fn(sk_avx512::Bitmap<T>{base});
  if (isa == ISA_AVX2) return fn(sk_avx2::Bitmap<T>{base});
#endif
  return fn(sk_scalar::Bitmap<T>{base});
}

}  // namespace

// x [..., K] (M rows; y [..., N]) (values' dtype), values [nnz], mask_bits [N, ceil(K/8)], offsets
// [N, ceil(K/64)] int32 (all contiguous, checked against each other by the caller), bias [N] or
// None -> y [M, N]; isa 0 scalar / 1 avx2 / 2 avx512 / 3 avx512-bf16; path 0 direct / 1 blas (tiles of about
// tile_bytes, 0: TILE_BYTES)
torch::Tensor mm_bitmap(torch::Tensor x, torch::Tensor values, torch::Tensor mask_bits, torch::Tensor offsets,
                        c10::optional<torch::Tensor> bias, int64_t isa, int64_t path, int64_t tile_bytes) {
  if (const LeadingDims lead{x}; lead.nested())  // x [..., K]
    return lead.back(mm_bitmap(lead.flat(), values, mask_bits, offsets, bias, isa, path, tile_bytes));
  const int64_t requested = isa;
  isa = check_isa(isa);
  const int64_t K = x.size(1), N = mask_bits.size(0);
#if SK_X86
  if (requested == ISA_AVX512_BF16 && path == PATH_DIRECT && x.scalar_type() == at::kBFloat16) {
    using BF = c10::BFloat16;
    const sk_avx512bf16::BitmapDot kern{{values.data_ptr<BF>(), mask_bits.data_ptr<uint8_t>(),
                                         offsets.data_ptr<int32_t>(), values.numel(), K, N}};
    return direct_mm_nb<BF>(kern, x, bias, N, K);
  }
#endif
  torch::Tensor y;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    y = with_bitmap<T>(isa, values, mask_bits, offsets, K,
                       [&](const auto& kern) { return run_mm<T>(kern, x, bias, N, K, path, tile_bytes); });
  });
  return y;
}

// rows [n0, n0 + out.size(0)) of the dense weight into out [rows, K] (contiguous)
void decompress_bitmap_rows(torch::Tensor values, torch::Tensor mask_bits, torch::Tensor offsets, int64_t n0,
                            torch::Tensor out, int64_t isa) {
  isa = check_isa(isa);
  const int64_t rows = out.size(0), K = out.size(1);
  dispatch_dtype(values.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    with_bitmap<T>(isa, values, mask_bits, offsets, K, [&](const auto& kern) {
      run_decompress<T>(kern, n0, rows, K, out.data_ptr<T>());
      return 0;
    });
  });
}
