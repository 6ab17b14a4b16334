// sparsekit's CPU kernels, part 2 of 5: 2:4 (compiled after cpu_common.cpp, in one unit).
//
// Format: values [N, K/2] (the two kept entries of each group of 4 columns), meta [N, ceil(K/8)]
// uint8 (one nibble per group, i0 | i1 << 2, i0 < i1 the kept slots; group g in byte g / 2, low
// nibble for even g).
//
// Direct path: never builds dense weight vectors; it gathers x instead. The two values of group g
// multiply x columns 4g + i0 and 4g + i1, so a vector of values meets a vector of x entries
// permuted by indices computed from the meta nibbles, once per weight row and step and reused
// for every row of x:
//   AVX-512: 16 values (8 groups) sit inside 32 columns of x: one two-source permute (vpermt2ps)
//            and one FMA per 16 values and row.
//   AVX2:    8 values (4 groups) sit inside 16 columns of x, which the driver lays out once per
//            call as columns [0-3, 8-11, 4-7, 12-15] (prepare_x): one load then holds groups 0 and 2,
//            one per 128-bit lane, and the next groups 1 and 3. vpermilps picks within a lane from
//            an index's low 2 bits, which are the slot as the nibbles store it, so the index of
//            value l is the meta word shifted right by 2l (one broadcast and one shift per 8
//            values): 2 in-lane permutes + 1 blend + 1 FMA per 8 values and row of x. (The
//            lane-crossing vpermps on x as stored, with per-lane base offsets, ran the SmolLM2 up
//            projection 1.4-1.7x slower at M = 1 on Zen 3.) One row of x and fp32 values: vpermps on
//            this layout (the 2 bits plus 4 in the upper lane), which streams from DRAM faster there.
//            One row of x (decode), int8 values: weight rows two at a time (dot2), sharing the x
//            loads, with four FMA chains where one row has two.
//   scalar:  acc += v0 * x[4g + i0] + v1 * x[4g + i1].
//   AVX-512 + BF16 (bf16 only): x stays bf16. The 32 values of 16 groups are 16 pairs, one per
//            32-bit lane; one two-source word permute (vpermt2w, indices from the 16 nibbles) puts
//            each pair's two x entries in its lane and one vdpbf16ps multiplies and adds both: 32
//            values per permute and dot instruction, twice the fp32 kernel's 16 per vpermt2ps + FMA.

namespace {

inline int nibble(const uint8_t* mrow, int64_t g) { return (mrow[g >> 1] >> ((g & 1) * 4)) & 15; }

// groups [g0, G) of one weight row against R rows of x: the scalar gather every ISA ends with
template <typename T, int R, typename X>
inline void dot24_tail(const T* vrow, const uint8_t* mrow, const X* x, int64_t ldx, int64_t g0, int64_t G,
                       float* acc) {
  for (int64_t g = g0; g < G; ++g) {
    const int nib = nibble(mrow, g);
    const int64_t c0 = 4 * g + (nib & 3), c1 = 4 * g + (nib >> 2);
    const float v0 = static_cast<float>(vrow[2 * g]), v1 = static_cast<float>(vrow[2 * g + 1]);
    for (int r = 0; r < R; ++r)
      acc[r] += v0 * static_cast<float>(x[r * ldx + c0]) + v1 * static_cast<float>(x[r * ldx + c1]);
  }
}

// groups [g0, G) of one weight row written dense (the select decompress_24_ref does: i0 wins a tie,
// which compress_24 never produces)
template <typename T>
inline void decompress24_tail(const T* vrow, const uint8_t* mrow, int64_t g0, int64_t G, T* wrow) {
  for (int64_t g = g0; g < G; ++g) {  // branch-free: zeros, then the two values (i0 last: it wins a tie)
    const int nib = nibble(mrow, g);
    for (int j = 0; j < 4; ++j) wrow[4 * g + j] = static_cast<T>(0.f);
    wrow[4 * g + (nib >> 2)] = vrow[2 * g + 1];
    wrow[4 * g + (nib & 3)] = vrow[2 * g];
  }
}

// what every ISA's 2:4 kernel holds: the stored tensors and the row geometry
template <typename T>
struct Sparse24Base {
  const T* v;
  const uint8_t* meta;
  int64_t K;
  int64_t ldv() const { return K / 2; }
  int64_t ldm() const { return (K + 7) / 8; }
  double row_bytes() const { return K / 2 * double(sizeof(T)) + ldm(); }
};

namespace sk_scalar {
template <typename T>
struct Sparse24 : Sparse24Base<T> {
  static constexpr int MB = 8;
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    dot24_tail<T, R>(this->v + n * this->ldv(), this->meta + n * this->ldm(), x, ldx, 0, this->K / 4, acc);
  }
  void decompress(int64_t n0, int64_t n1, T* out) const {
    for (int64_t n = n0; n < n1; ++n)
      decompress24_tail<T>(this->v + n * this->ldv(), this->meta + n * this->ldm(), 0, this->K / 4,
                           out + (n - n0) * this->K);
  }
};
}  // namespace sk_scalar

#if SK_X86
SK_BEGIN_AVX2
namespace sk_avx2 {
// vpermilps indices of 16 values (8 groups, 32 columns) from their 8 nibbles (32 bits), 8 values
// per vector: lane l of the first is bits 2l, 2l + 1 of the word (value l % 2 of group l / 2), of
// the second bits 16 + 2l; vpermilps reads only those two bits of each lane. Cross: the same
// choice as vpermps indices (the 2 bits, plus 4 in the upper lane), for one row of x (below)
template <bool Cross>
struct Gather24 {
  __m256i shift_lo, shift_hi, three, upper;
  Gather24() {
    alignas(32) int32_t s[8], u[8];
    for (int l = 0; l < 8; ++l) { s[l] = 2 * l; u[l] = l < 4 ? 0 : 4; }
    shift_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    shift_hi = _mm256_add_epi32(shift_lo, _mm256_set1_epi32(16));
    upper = _mm256_load_si256(reinterpret_cast<const __m256i*>(u));
    three = _mm256_set1_epi32(3);
  }
  // the meta word at p, broadcast straight from memory (no general-register transfer)
  static inline __m256i word(const uint8_t* p) {
    return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
  }
  inline __m256i index(__m256i shifted) const {
    if constexpr (Cross) return _mm256_add_epi32(_mm256_and_si256(shifted, three), upper);
    return shifted;
  }
  inline __m256i lo(__m256i w) const { return index(_mm256_srlv_epi32(w, shift_lo)); }
  inline __m256i hi(__m256i w) const { return index(_mm256_srlv_epi32(w, shift_hi)); }
  // x of 16 columns in prepare_x's layout (x0: the first 8, x1: the next), laid against 8 values
  // with indices idx
  static inline __m256 gather_x(__m256 x0, __m256 x1, __m256i idx) {
    if constexpr (Cross)
      return _mm256_blend_ps(_mm256_permutevar8x32_ps(x0, idx), _mm256_permutevar8x32_ps(x1, idx), 0xCC);
    return _mm256_blend_ps(_mm256_permutevar_ps(x0, idx), _mm256_permutevar_ps(x1, idx), 0xCC);
  }
  static inline __m256 gather_x(const float* xr, __m256i idx) {
    return gather_x(_mm256_loadu_ps(xr), _mm256_loadu_ps(xr + 8), idx);
  }
};

// one row of x [K] in the dot kernel's layout: in each 32-column step of the main loop, columns
// [0-3, 8-11, 4-7, 12-15] of each 16; the columns after the last whole step (the scalar tail) as
// they are
inline void lay_out_x24(const float* x, float* out, int64_t K) {
  const int64_t body = K / 32 * 32;
  for (int64_t c = 0; c < body; c += 16) {
    _mm_storeu_ps(out + c, _mm_loadu_ps(x + c));
    _mm_storeu_ps(out + c + 4, _mm_loadu_ps(x + c + 8));
    _mm_storeu_ps(out + c + 8, _mm_loadu_ps(x + c + 4));
    _mm_storeu_ps(out + c + 12, _mm_loadu_ps(x + c + 12));
  }
  std::copy(x + body, x + K, out + body);
}

// dense lanes of 8 columns (2 groups, 2q and 2q + 1 of the 4 whose 16-bit nibbles are given) from
// the 8 values of those 4 groups
struct Expand24 {
  __m256i shift[2], src[2], slot, three, one;
  Expand24() {
    alignas(32) int32_t s[2][8], b[2][8], j[8];
    for (int q = 0; q < 2; ++q)
      for (int l = 0; l < 8; ++l) { s[q][l] = 4 * (2 * q + l / 4); b[q][l] = 4 * q + 2 * (l / 4); }
    for (int l = 0; l < 8; ++l) j[l] = l % 4;
    for (int q = 0; q < 2; ++q) {
      shift[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(s[q]));
      src[q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b[q]));
    }
    slot = _mm256_load_si256(reinterpret_cast<const __m256i*>(j));
    three = _mm256_set1_epi32(3);
    one = _mm256_set1_epi32(1);
  }
  inline __m256 dense(int q, uint32_t nibbles, __m256 values) const {
    const __m256i nib = _mm256_srlv_epi32(_mm256_set1_epi32(int(nibbles)), shift[q]);
    const __m256i k0 = _mm256_cmpeq_epi32(_mm256_and_si256(nib, three), slot);
    const __m256i k1 = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srli_epi32(nib, 2), three), slot);
    const __m256i idx = _mm256_add_epi32(src[q], _mm256_and_si256(_mm256_andnot_si256(k0, k1), one));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(values, idx), _mm256_castsi256_ps(_mm256_or_si256(k0, k1)));
  }
};

template <typename T>
struct Sparse24 : Sparse24Base<T> {
  static constexpr int MB = 4;  // 2 accumulators per row of x + 4 value/index registers of 16
  // x as dot() reads it (the driver calls this once per row of x and call)
  void prepare_x(const float* x, float* out) const { lay_out_x24(x, out, this->K); }
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    // fp32 values and one row of x (decode, 4 bytes a value from DRAM): the lane-crossing vpermps,
    // 1.10-1.31x faster than vpermilps on Llama-2-7B's shapes on Zen 3
    // (docs/data/kernel-ab-avx2-24-cross-llama); bf16 or int8 values (more work per byte) or more
    // rows: vpermilps, which stayed ahead there in a probe
    const Gather24<R == 1 && std::is_same_v<T, float>> X;  // local: its constants stay in registers
    const T* vrow = this->v + n * this->ldv();
    const uint8_t* mrow = this->meta + n * this->ldm();
    const int64_t G = this->K / 4;
    __m256 a[R], b[R];  // two independent FMA chains per row
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {  // 32 columns: 16 values, 4 meta bytes
      const char* vnext = reinterpret_cast<const char*>(vrow + 2 * g) + PF_BYTES;
      _mm_prefetch(vnext, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mrow + g / 2) + PF_BYTES / 8, _MM_HINT_T0);
      const __m256i w = X.word(mrow + g / 2);
      const __m256i ia = X.lo(w), ib = X.hi(w);
      const __m256 va = load8<T>(vrow + 2 * g), vb = load8<T>(vrow + 2 * g + 8);
      const float* xk = x + 4 * g;
      for (int r = 0; r < R; ++r) {
        a[r] = _mm256_fmadd_ps(va, X.gather_x(xk + r * ldx, ia), a[r]);
        b[r] = _mm256_fmadd_ps(vb, X.gather_x(xk + r * ldx + 16, ib), b[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = hsum(_mm256_add_ps(a[r], b[r]));
    dot24_tail<T, R>(vrow, mrow, x, ldx, g, G, acc);
  }
  // weight rows n, n + 1 against one row of x (decode): the x loads shared, four FMA chains where
  // dot<1> has two. int8 values (2:4 + int8) only: there it ran SmolLM2's shapes 1.09-1.18x faster
  // on Zen 3 and Llama-2-7B's level (docs/data/kernel-ab-avx2-decode-pairs-*); on fp32 values it ran
  // SmolLM2's 0.87x (-try1-smollm2), on bf16 values it did not hold up (results.md, round three)
  static constexpr bool PAIRED_DECODE = std::is_same_v<T, int8_t>;
  void dot2(int64_t n, const float* x, float* acc) const {
    const Gather24<false> X;
    const T* v0 = this->v + n * this->ldv();
    const T* v1 = v0 + this->ldv();
    const uint8_t* m0 = this->meta + n * this->ldm();
    const uint8_t* m1 = m0 + this->ldm();
    const int64_t G = this->K / 4;
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {  // 32 columns: 16 values and 4 meta bytes of each row
      _mm_prefetch(reinterpret_cast<const char*>(v0 + 2 * g) + PF_BYTES, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v1 + 2 * g) + PF_BYTES, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(m0 + g / 2) + PF_BYTES / 8, _MM_HINT_T0);
      const __m256i w0 = X.word(m0 + g / 2), w1 = X.word(m1 + g / 2);
      const float* xk = x + 4 * g;
      const __m256 x0 = _mm256_loadu_ps(xk), x1 = _mm256_loadu_ps(xk + 8);
      const __m256 x2 = _mm256_loadu_ps(xk + 16), x3 = _mm256_loadu_ps(xk + 24);
      a0 = _mm256_fmadd_ps(load8<T>(v0 + 2 * g), X.gather_x(x0, x1, X.lo(w0)), a0);
      a1 = _mm256_fmadd_ps(load8<T>(v1 + 2 * g), X.gather_x(x0, x1, X.lo(w1)), a1);
      b0 = _mm256_fmadd_ps(load8<T>(v0 + 2 * g + 8), X.gather_x(x2, x3, X.hi(w0)), b0);
      b1 = _mm256_fmadd_ps(load8<T>(v1 + 2 * g + 8), X.gather_x(x2, x3, X.hi(w1)), b1);
    }
    acc[0] = hsum(_mm256_add_ps(a0, b0));
    acc[1] = hsum(_mm256_add_ps(a1, b1));
    dot24_tail<T, 1>(v0, m0, x, 0, g, G, acc);
    dot24_tail<T, 1>(v1, m1, x, 0, g, G, acc + 1);
  }
  void decompress(int64_t n0, int64_t n1, T* out) const {
    static const Expand24 E;
    const int64_t G = this->K / 4;
    for (int64_t n = n0; n < n1; ++n) {
      const T* vrow = this->v + n * this->ldv();
      const uint8_t* mrow = this->meta + n * this->ldm();
      T* wrow = out + (n - n0) * this->K;
      int64_t g = 0;
      for (; g + 4 <= G; g += 4) {  // 16 columns: 8 values, 2 meta bytes
        uint16_t mw;
        std::memcpy(&mw, mrow + g / 2, 2);
        const __m256 va = load8<T>(vrow + 2 * g);
        store8<T>(wrow + 4 * g, E.dense(0, mw, va));
        store8<T>(wrow + 4 * g + 8, E.dense(1, mw, va));
      }
      decompress24_tail<T>(vrow, mrow, g, G, wrow);
    }
  }
};
}  // namespace sk_avx2
SK_END_ISA

SK_BEGIN_AVX512
namespace sk_avx512 {
// permute indices of 16 values (8 groups, 32 columns of x) from their 8 nibbles (32 bits)
struct Gather24 {
  __m512i shift, base, three;
  Gather24() {
    alignas(64) int32_t s[16], b[16];
    // lane l: value l % 2 of group l / 2: its slot is bits 4 * (l / 2) + 2 * (l % 2) of the nibbles
    for (int l = 0; l < 16; ++l) { s[l] = 4 * (l / 2) + 2 * (l % 2); b[l] = 4 * (l / 2); }
    shift = _mm512_load_si512(s);
    base = _mm512_load_si512(b);
    three = _mm512_set1_epi32(3);
  }
  inline __m512i index(uint32_t nibbles) const {
    return _mm512_add_epi32(base, _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(nibbles)), shift), three));
  }
};

// 64 columns = 16 groups: meta word mw (16 nibbles), values va (groups 0..7), vb (groups 8..15).
// Lane l of dense vector q is column 16q + l: group 4q + l/4, slot j = l%4.
struct Expand24 {
  __m512i shift, slot, src, one, three;
  Expand24() {
    alignas(64) int32_t s[16], j[16], b[16];
    for (int l = 0; l < 16; ++l) { s[l] = 4 * (l / 4); j[l] = l % 4; b[l] = 2 * (l / 4); }
    shift = _mm512_load_si512(s);
    slot = _mm512_load_si512(j);
    src = _mm512_load_si512(b);
    one = _mm512_set1_epi32(1);
    three = _mm512_set1_epi32(3);
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

template <typename T>
struct Sparse24 : Sparse24Base<T> {
  static constexpr int MB = 8;  // 16 accumulators + temporaries fit the 32 zmm registers
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    static const Gather24 X;
    const T* vrow = this->v + n * this->ldv();
    const uint8_t* mrow = this->meta + n * this->ldm();
    const int64_t G = this->K / 4;
    __m512 a[R], b[R];  // two independent FMA chains per row (first and second 32 columns)
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) {  // 64 columns: 32 values, 8 meta bytes
      // the weight streams from DRAM once per token: ask for it PF_BYTES ahead (past the row's
      // end this is the next row, stored right after it)
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
    dot24_tail<T, R>(vrow, mrow, x, ldx, g, G, acc);
  }
  void decompress(int64_t n0, int64_t n1, T* out) const {
    static const Expand24 E;
    const int64_t G = this->K / 4;
    for (int64_t n = n0; n < n1; ++n) {
      const T* vrow = this->v + n * this->ldv();
      const uint8_t* mrow = this->meta + n * this->ldm();
      T* wrow = out + (n - n0) * this->K;
      int64_t g = 0;
      for (; g + 16 <= G; g += 16) {
        uint64_t mw;
        std::memcpy(&mw, mrow + g / 2, 8);
        const __m512 va = load16<T>(vrow + 2 * g), vb = load16<T>(vrow + 2 * g + 16);
        store16<T>(wrow + 4 * g, E.dense<0>(mw, va, vb));
        store16<T>(wrow + 4 * g + 16, E.dense<1>(mw, va, vb));
        store16<T>(wrow + 4 * g + 32, E.dense<2>(mw, va, vb));
        store16<T>(wrow + 4 * g + 48, E.dense<3>(mw, va, vb));
      }
      decompress24_tail<T>(vrow, mrow, g, G, wrow);
    }
  }
};
}  // namespace sk_avx512
SK_END_ISA

SK_BEGIN_AVX512BF16
namespace sk_avx512bf16 {
// word permute indices of 32 values (16 groups, 64 columns of x: 32 words in each source) from
// their 16 nibbles mw: word lane w is value w % 2 of group w / 2, whose nibble sits in byte w / 4
// of mw at bit 4 * ((w / 2) % 2), its slot 2 bits above that for the second value: 2 * (w % 4)
struct Gather24W {
  __m512i pick, shift, base, three;
  Gather24W() {
    alignas(64) uint8_t p[64];
    alignas(64) int16_t s[32], b[32];
    for (int w = 0; w < 32; ++w) {
      // _mm512_set1_epi64 puts mw in bytes 0-7 and 8-15 of every 128-bit lane: byte w / 4 of mw
      // is lane byte w / 4 (< 8); the word's high byte is zeroed (0x80)
      p[(2 * w) % 64] = uint8_t(w / 4);
      p[(2 * w + 1) % 64] = 0x80;
      s[w] = int16_t(2 * (w % 4));
      b[w] = int16_t(4 * (w / 2));
    }
    pick = _mm512_load_si512(p);
    shift = _mm512_load_si512(s);
    base = _mm512_load_si512(b);
    three = _mm512_set1_epi16(3);
  }
  inline __m512i index(uint64_t mw) const {
    const __m512i bytes = _mm512_shuffle_epi8(_mm512_set1_epi64(int64_t(mw)), pick);
    return _mm512_add_epi16(base, _mm512_and_si512(_mm512_srlv_epi16(bytes, shift), three));
  }
};

// 32 values as bf16: as stored, or int8 (2:4 + int8) widened and packed, exact (|v| <= 127)
inline __m512bh values32(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh values32(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);  // words 0-15 from lo, 16-31 from hi
}

// values V (bf16, or int8 whose row scale the driver applies), bf16 x: vdpbf16ps takes 32 bf16
// products per instruction into 16 fp32 lanes (products exact, sums in fp32; like every
// AVX512_BF16 op it treats subnormal inputs as zero). dot<NB, R> runs NB weight rows against R
// rows of x: each x load serves NB rows' permutes, so the loads per dot instruction fall from 2 to
// 2 / NB.
template <typename V>
struct Sparse24Dot : Sparse24Base<V> {
  using BF = c10::BFloat16;
  static constexpr int NB = 4, MB = 4;  // 16 accumulators + 4 indices + 4 value vectors + x
  template <int NR, int R>
  void dot(int64_t n, const BF* x, int64_t ldx, float (*acc)[R]) const {
    static const Gather24W X;
    const V* vrow[NR];
    const uint8_t* mrow[NR];
    for (int j = 0; j < NR; ++j) {
      vrow[j] = this->v + (n + j) * this->ldv();
      mrow[j] = this->meta + (n + j) * this->ldm();
    }
    const int64_t G = this->K / 4;
    __m512 a[NR][R];
    for (int j = 0; j < NR; ++j)
      for (int r = 0; r < R; ++r) a[j][r] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) {  // 64 columns: 32 values and 8 meta bytes per row
      __m512i idx[NR];
      __m512bh vals[NR];
      for (int j = 0; j < NR; ++j) {
        // the same columns NB rows on (the next block's row j): NR streams run side by side
        _mm_prefetch(reinterpret_cast<const char*>(vrow[j] + 2 * g + NB * this->ldv()), _MM_HINT_T0);
        uint64_t mw;
        std::memcpy(&mw, mrow[j] + g / 2, 8);
        idx[j] = X.index(mw);
        vals[j] = values32(vrow[j] + 2 * g);
      }
      const BF* xk = x + 4 * g;
      for (int r = 0; r < R; ++r) {
        const __m512i lo = _mm512_loadu_si512(xk + r * ldx), hi = _mm512_loadu_si512(xk + r * ldx + 32);
        for (int j = 0; j < NR; ++j)
          a[j][r] = _mm512_dpbf16_ps(a[j][r], (__m512bh)_mm512_permutex2var_epi16(lo, idx[j], hi), vals[j]);
      }
    }
    for (int j = 0; j < NR; ++j) {
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_reduce_add_ps(a[j][r]);
      dot24_tail<V, R>(vrow[j], mrow[j], x, ldx, g, G, acc[j]);
    }
  }
};

}  // namespace sk_avx512bf16
SK_END_ISA
#endif  // SK_X86

// fn(kernel) with the 2:4 kernel of this ISA for dtype T
template <typename T, typename Fn>
auto with_sparse24(int64_t isa, const torch::Tensor& values, const torch::Tensor& meta, int64_t K, Fn&& fn) {
  const T* v = values.data_ptr<T>();
  const uint8_t* m = meta.data_ptr<uint8_t>();
#if SK_X86
  if (isa == ISA_AVX512) return fn(sk_avx512::Sparse24<T>{{v, m, K}});
  if (isa == ISA_AVX2) return fn(sk_avx2::Sparse24<T>{{v, m, K}});
#endif
  return fn(sk_scalar::Sparse24<T>{{v, m, K}});
}

}  // namespace

// x [..., K] (M rows; y [..., N]) (values' dtype), values [N, K/2] and meta [N, ceil(K/8)] contiguous,
// bias [N] or None -> y [M, N]; isa 0 scalar / 1 avx2 / 2 avx512 / 3 avx512-bf16; path 0 direct / 1 blas, whose
// decompressed tiles hold about tile_bytes each (0: TILE_BYTES)
torch::Tensor mm24(torch::Tensor x, torch::Tensor values, torch::Tensor meta, c10::optional<torch::Tensor> bias,
                   int64_t isa, int64_t path, int64_t tile_bytes) {
  if (const LeadingDims lead{x}; lead.nested())  // x [..., K]
    return lead.back(mm24(lead.flat(), values, meta, bias, isa, path, tile_bytes));
  const int64_t requested = isa;
  isa = check_isa(isa);
  const int64_t K = x.size(1), N = values.size(0);
#if SK_X86
  if (requested == ISA_AVX512_BF16 && path == PATH_DIRECT && x.scalar_type() == at::kBFloat16) {
    using BF = c10::BFloat16;
    return direct_mm_nb<BF>(sk_avx512bf16::Sparse24Dot<BF>{{values.data_ptr<BF>(), meta.data_ptr<uint8_t>(), K}}, x,
                            bias, N, K);
  }
#endif
  torch::Tensor y;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    y = with_sparse24<T>(isa, values, meta, K,
                         [&](const auto& kern) { return run_mm<T>(kern, x, bias, N, K, path, tile_bytes); });
  });
  return y;
}

namespace {

// ------------------------------------------------------------------------- dense int8 rows
// Weight-only int8 without sparsity, W [N, K] int8 row-major: the direct path's kernel for the int8
// format where torch's own op has no fast path (fp32 activations). dot() widens 16 (AVX-512) or 8
// (AVX2) int8 weights to fp32 per step and FMAs them with x; the row's scale is applied by the
// driver (rows_block), once per dot product.
struct DenseQ8Base {
  const int8_t* w;
  int64_t K;
  double row_bytes() const { return double(K); }
};

namespace sk_scalar {
struct DenseQ8 : DenseQ8Base {
  static constexpr int MB = 8;
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    const int8_t* wr = w + n * K;
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = float(wr[k]);
      for (int r = 0; r < R; ++r) acc[r] += v * x[r * ldx + k];
    }
  }
};
}  // namespace sk_scalar

#if SK_X86
SK_BEGIN_AVX2
namespace sk_avx2 {
struct DenseQ8 : DenseQ8Base {
  static constexpr int MB = 4;
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    const int8_t* wr = w + n * K;
    __m256 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + PF_BYTES, _MM_HINT_T0);
      const __m256 wa = load8<int8_t>(wr + k), wb = load8<int8_t>(wr + k + 8);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x + r * ldx + k), a[r]);
        b[r] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(x + r * ldx + k + 8), b[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = hsum(_mm256_add_ps(a[r], b[r]));
    for (; k < K; ++k)
      for (int r = 0; r < R; ++r) acc[r] += float(wr[k]) * x[r * ldx + k];
  }
};
}  // namespace sk_avx2
SK_END_ISA

SK_BEGIN_AVX512
namespace sk_avx512 {
struct DenseQ8 : DenseQ8Base {
  static constexpr int MB = 8;
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    const int8_t* wr = w + n * K;
    __m512 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + PF_BYTES, _MM_HINT_T0);
      const __m512 wa = load16<int8_t>(wr + k), wb = load16<int8_t>(wr + k + 16);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(x + r * ldx + k), a[r]);
        b[r] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(x + r * ldx + k + 16), b[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
    for (; k < K; ++k)
      for (int r = 0; r < R; ++r) acc[r] += float(wr[k]) * x[r * ldx + k];
  }
};
}  // namespace sk_avx512
SK_END_ISA
#endif  // SK_X86

// ------------------------------------------------------------------------- weight-only int4
// packed uint8 [N, K/2] (column 2j the low nibble, 2j + 1 the high), codes 0..15, groups of G
// inputs with sz [K/G, N, 2] = (scale, zero) fp32: w = (q - 8) * scale + zero. The driver hands
// each row of x rearranged per group as [x even columns (G/2) | x odd columns (G/2)] followed by
// the K/G group sums of x, so y[n] = sum_g scale_g * sum_j (lo_j x_2j + hi_j x_2j+1)
// + (zero_g - 8 scale_g) * xsum_g, the nibbles never interleaved in registers.
struct DenseQ4Base {
  const uint8_t* w;
  const float* sz;
  int64_t K, G, N;
  double row_bytes() const { return double(K) / 2; }
  float offset(int64_t n, int64_t g) const { return sz[(g * N + n) * 2 + 1] - 8.f * sz[(g * N + n) * 2]; }
};

namespace sk_scalar {
struct DenseQ4 : DenseQ4Base {
  static constexpr int MB = 8;
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    const uint8_t* wr = w + n * (K / 2);
    const int64_t half = G / 2;
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    for (int64_t g = 0; g < K / G; ++g) {
      const float scale = sz[(g * N + n) * 2], off = offset(n, g);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * ldx + g * G;
        float part = 0.f;
        for (int64_t j = 0; j < half; ++j) {
          const uint8_t b = wr[g * half + j];
          part += float(b & 15) * xr[j] + float(b >> 4) * xr[half + j];
        }
        acc[r] += scale * part + off * x[r * ldx + K + g];
      }
    }
  }
};
}  // namespace sk_scalar

#if SK_X86
SK_BEGIN_AVX2
namespace sk_avx2 {
struct DenseQ4 : DenseQ4Base {
  static constexpr int MB = 4;
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    const uint8_t* wr = w + n * (K / 2);
    const int64_t half = G / 2;  // a multiple of 8 (G in 32, 64, 128, 256)
    const __m256i low = _mm256_set1_epi32(15);
    __m256 a[R];
    float tail[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps(), tail[r] = 0.f;
    for (int64_t g = 0; g < K / G; ++g) {
      __m256 v[R];
      for (int r = 0; r < R; ++r) v[r] = _mm256_setzero_ps();
      for (int64_t j = 0; j < half; j += 8) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + g * half + j)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
        for (int r = 0; r < R; ++r) {
          const float* xr = x + r * ldx + g * G + j;
          v[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), v[r]);
          v[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr + half), v[r]);
        }
      }
      const __m256 scale = _mm256_set1_ps(sz[(g * N + n) * 2]);
      const float off = offset(n, g);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm256_fmadd_ps(scale, v[r], a[r]);
        tail[r] += off * x[r * ldx + K + g];
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = hsum(a[r]) + tail[r];
  }
};
}  // namespace sk_avx2
SK_END_ISA

SK_BEGIN_AVX512
namespace sk_avx512 {
struct DenseQ4 : DenseQ4Base {
  static constexpr int MB = 8;
  template <int R>
  void dot(int64_t n, const float* x, int64_t ldx, float* acc) const {
    const uint8_t* wr = w + n * (K / 2);
    const int64_t half = G / 2;  // a multiple of 16 (G in 32, 64, 128, 256)
    const __m512i low = _mm512_set1_epi32(15);
    __m512 a[R];
    float tail[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps(), tail[r] = 0.f;
    for (int64_t g = 0; g < K / G; ++g) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + g * half) + PF_BYTES, _MM_HINT_T0);
      __m512 v[R];
      for (int r = 0; r < R; ++r) v[r] = _mm512_setzero_ps();
      for (int64_t j = 0; j < half; j += 16) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + g * half + j)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, low));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
        for (int r = 0; r < R; ++r) {
          const float* xr = x + r * ldx + g * G + j;
          v[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), v[r]);
          v[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + half), v[r]);
        }
      }
      const __m512 scale = _mm512_set1_ps(sz[(g * N + n) * 2]);
      const float off = offset(n, g);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm512_fmadd_ps(scale, v[r], a[r]);
        tail[r] += off * x[r * ldx + K + g];
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(a[r]) + tail[r];
  }
};
}  // namespace sk_avx512
SK_END_ISA
#endif  // SK_X86

// ------------------------------------------------------------------------- quantized blas path
// Above the direct kernels' M (prefill, batches), a quantized layer hands dequantized tiles of
// its weight rows to ATen's GEMM (blas_mm): each tile is dequantized into a per-thread buffer
// that stays in L2, so no dense weight is written to memory and none is held. The arithmetic is
// fp32, rounded once to T (round to nearest even, as torch's casts). Row helpers per ISA:
//   q8_row   out[k] = q[k] * s                                  (int8 values, one scale)
//   q4_row   out[2j] = (lo_j - 8) * scale_g + zero_g, out[2j+1] from hi_j (packed nibbles); a
//            product, then a sum (no FMA), rounded as quant.dequantize_int4 rounds them
namespace sk_scalar {
template <typename T>
inline void q8_row(const int8_t* q, float s, T* out, int64_t K) {
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<T>(float(q[k]) * s);
}
template <typename T>
inline void q4_row(const uint8_t* p, const float* sz, int64_t N, int64_t n, int64_t K, int64_t G, T* out) {
  for (int64_t g = 0; g < K / G; ++g) {
    const float scale = sz[(g * N + n) * 2], zero = sz[(g * N + n) * 2 + 1];
    for (int64_t j = g * G / 2; j < (g + 1) * G / 2; ++j) {
      out[2 * j] = static_cast<T>(float(int(p[j] & 15) - 8) * scale + zero);
      out[2 * j + 1] = static_cast<T>(float(int(p[j] >> 4) - 8) * scale + zero);
    }
  }
}
}  // namespace sk_scalar

#if SK_X86
SK_BEGIN_AVX2
namespace sk_avx2 {
template <typename T> inline void store8_rne(T* p, __m256 v) { store8<T>(p, v); }
template <> inline void store8_rne<c10::BFloat16>(c10::BFloat16* p, __m256 v) {
  __m256i b = _mm256_castps_si256(v);  // finite lanes: add 0x7FFF + the kept lsb, keep the top half
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
// a * b + c with the product rounded first (no FMA contraction), as torch computes it unfused
inline __m256 mul_then_add(__m256 a, __m256 b, __m256 c) {
  __m256 p = _mm256_mul_ps(a, b);
  __asm__("" : "+v"(p));
  return _mm256_add_ps(p, c);
}
template <typename T>
inline void q8_row(const int8_t* q, float s, T* out, int64_t K) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) store8_rne<T>(out + k, _mm256_mul_ps(load8<int8_t>(q + k), vs));
  for (; k < K; ++k) out[k] = static_cast<T>(float(q[k]) * s);
}
template <typename T>
inline void q4_row(const uint8_t* p, const float* sz, int64_t N, int64_t n, int64_t K, int64_t G, T* out) {
  if (G % 16) return sk_scalar::q4_row<T>(p, sz, N, n, K, G, out);
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  for (int64_t g = 0; g < K / G; ++g) {
    const __m256 vs = _mm256_set1_ps(sz[(g * N + n) * 2]), vz = _mm256_set1_ps(sz[(g * N + n) * 2 + 1]);
    for (int64_t j = g * G / 2; j < (g + 1) * G / 2; j += 8) {  // 8 bytes -> 16 columns
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
      const __m256i cl = _mm256_sub_epi32(_mm256_and_si256(b, low), eight);
      const __m256i ch = _mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight);
      const __m256 lo = mul_then_add(_mm256_cvtepi32_ps(cl), vs, vz);
      const __m256 hi = mul_then_add(_mm256_cvtepi32_ps(ch), vs, vz);
      const __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi);  // per 128-bit lane
      store8_rne<T>(out + 2 * j, _mm256_permute2f128_ps(a, c, 0x20));
      store8_rne<T>(out + 2 * j + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
  }
}
}  // namespace sk_avx2
SK_END_ISA

SK_BEGIN_AVX512
namespace sk_avx512 {
template <typename T> inline void store16_rne(T* p, __m512 v) { store16<T>(p, v); }
template <> inline void store16_rne<c10::BFloat16>(c10::BFloat16* p, __m512 v) {
  __m512i b = _mm512_castps_si512(v);  // finite lanes: add 0x7FFF + the kept lsb, keep the top half
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}
// a * b + c with the product rounded first (no FMA contraction), as torch computes it unfused
inline __m512 mul_then_add(__m512 a, __m512 b, __m512 c) {
  __m512 p = _mm512_mul_ps(a, b);
  __asm__("" : "+v"(p));
  return _mm512_add_ps(p, c);
}
template <typename T>
inline void q8_row(const int8_t* q, float s, T* out, int64_t K) {
  const __m512 vs = _mm512_set1_ps(s);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) store16_rne<T>(out + k, _mm512_mul_ps(load16<int8_t>(q + k), vs));
  for (; k < K; ++k) out[k] = static_cast<T>(float(q[k]) * s);
}
template <typename T>
inline void q4_row(const uint8_t* p, const float* sz, int64_t N, int64_t n, int64_t K, int64_t G, T* out) {
  if (G % 32) return sk_scalar::q4_row<T>(p, sz, N, n, K, G, out);
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  alignas(64) int32_t i0[16], i1[16];
  for (int l = 0; l < 16; ++l) i0[l] = (l / 2) + 16 * (l % 2), i1[l] = 8 + (l / 2) + 16 * (l % 2);
  const __m512i first = _mm512_load_si512(i0), second = _mm512_load_si512(i1);
  for (int64_t g = 0; g < K / G; ++g) {
    const __m512 vs = _mm512_set1_ps(sz[(g * N + n) * 2]), vz = _mm512_set1_ps(sz[(g * N + n) * 2 + 1]);
    for (int64_t j = g * G / 2; j < (g + 1) * G / 2; j += 16) {  // 16 bytes -> 32 columns
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
      const __m512i cl = _mm512_sub_epi32(_mm512_and_si512(b, low), eight);
      const __m512i ch = _mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight);
      const __m512 lo = mul_then_add(_mm512_cvtepi32_ps(cl), vs, vz);
      const __m512 hi = mul_then_add(_mm512_cvtepi32_ps(ch), vs, vz);
      store16_rne<T>(out + 2 * j, _mm512_permutex2var_ps(lo, first, hi));
      store16_rne<T>(out + 2 * j + 16, _mm512_permutex2var_ps(lo, second, hi));
    }
  }
}
}  // namespace sk_avx512
SK_END_ISA
#endif  // SK_X86

template <int ISA, typename T>
inline void q8_row(const int8_t* q, float s, T* out, int64_t K) {
#if SK_X86
  if constexpr (ISA == ISA_AVX512) return sk_avx512::q8_row<T>(q, s, out, K);
  if constexpr (ISA == ISA_AVX2) return sk_avx2::q8_row<T>(q, s, out, K);
#endif
  sk_scalar::q8_row<T>(q, s, out, K);
}

template <typename T, int ISA>
struct DequantQ8 {  // w = q * scale[n]
  const int8_t* q;
  const float* scale;
  int64_t K;
  void decompress(int64_t n0, int64_t n1, T* out) const {
    for (int64_t n = n0; n < n1; ++n) q8_row<ISA, T>(q + n * K, scale[n], out + (n - n0) * K, K);
  }
};

template <typename T, int ISA>
struct DequantQ4 {  // w = (code - 8) * scale_g + zero_g; sz [K/G, N, 2] fp32
  const uint8_t* packed;
  const float* sz;
  int64_t K, G, N;
  void decompress(int64_t n0, int64_t n1, T* out) const {
    for (int64_t n = n0; n < n1; ++n) {
      T* o = out + (n - n0) * K;
      const uint8_t* p = packed + n * (K / 2);
#if SK_X86
      if constexpr (ISA == ISA_AVX512) { sk_avx512::q4_row<T>(p, sz, N, n, K, G, o); continue; }
      if constexpr (ISA == ISA_AVX2) { sk_avx2::q4_row<T>(p, sz, N, n, K, G, o); continue; }
#endif
      sk_scalar::q4_row<T>(p, sz, N, n, K, G, o);
    }
  }
};

template <typename T, int ISA>
struct Dequant24Q8 {  // w = scale[n] * decompress_24(values, meta): the row's values, then the 2:4 expand
  const int8_t* v;
  const uint8_t* meta;
  const float* scale;
  int64_t K;
  void decompress(int64_t n0, int64_t n1, T* out) const {
    const int64_t ldv = K / 2, ldm = (K + 7) / 8;
    std::vector<T> vals(ldv);
    for (int64_t n = n0; n < n1; ++n) {
      q8_row<ISA, T>(v + n * ldv, scale[n], vals.data(), ldv);
      T* o = out + (n - n0) * K;
#if SK_X86
      if constexpr (ISA == ISA_AVX512) { sk_avx512::Sparse24<T>{{vals.data(), meta + n * ldm, K}}.decompress(0, 1, o); continue; }
      if constexpr (ISA == ISA_AVX2) { sk_avx2::Sparse24<T>{{vals.data(), meta + n * ldm, K}}.decompress(0, 1, o); continue; }
#endif
      sk_scalar::Sparse24<T>{{vals.data(), meta + n * ldm, K}}.decompress(0, 1, o);
    }
  }
};

template <template <typename, int> class Kern, typename... Args>
torch::Tensor quant_blas(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, int64_t N, int64_t K,
                         int64_t isa, int64_t tile_bytes, Args... args) {
  isa = check_isa(isa);
  at::NoGradGuard no_grad;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "quantized blas path: x must be [M, ", K,
              "] contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == N && bias->is_contiguous(),
                "quantized blas path: bias must be [", N, "] in x's dtype");
  const int64_t M = x.size(0);
  if (M == 0 || N == 0) return torch::empty({M, N}, x.options());
  const int64_t tile = tile_bytes > 0 ? tile_bytes : TILE_BYTES;
  torch::Tensor y;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
#if SK_X86
    if (isa == ISA_AVX512) { y = blas_mm<T>(Kern<T, ISA_AVX512>{args...}, x, bias, N, K, tile); return; }
    if (isa == ISA_AVX2) { y = blas_mm<T>(Kern<T, ISA_AVX2>{args...}, x, bias, N, K, tile); return; }
#endif
    y = blas_mm<T>(Kern<T, ISA_SCALAR>{args...}, x, bias, N, K, tile);
  });
  return y;
}

// fn(x as fp32, bias, y) for the direct drivers of weight-only int8 kernels
template <typename Fn>
torch::Tensor q8_direct(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, int64_t N, Fn&& fn,
                        c10::optional<at::ScalarType> out = c10::nullopt) {
  at::NoGradGuard no_grad;
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options().dtype(out.value_or(x.scalar_type())));
  if (M == 0 || N == 0) return y;
  std::vector<float> keep;
  const float* xf = as_fp32(x, keep);
  dispatch_dtype(y.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fn(tag, xf, bias.has_value() ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>());
  });
  return y;
}

}  // namespace

// weight-only int8: x [..., K] (M rows; y [..., N]) (fp32/bf16/fp16), q int8 [N, K] contiguous, scale fp32 [N],
// bias [N] (x's dtype) or None -> y [M, N] = x @ (scale[:, None] * q).T + bias; direct path
torch::Tensor mm_q8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                    int64_t isa) {
  if (const LeadingDims lead{x}; lead.nested())  // x [..., K]
    return lead.back(mm_q8(lead.flat(), q, scale, bias, isa));
  isa = check_isa(isa);
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat, "mm_q8: q must be int8, scale fp32");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const int8_t* w = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  return q8_direct(x, bias, N, [&](auto tag, const float* xf, const auto* bp, auto* yp) {
    using T = decltype(tag);
#if SK_X86
    if (isa == ISA_AVX512) return direct_mm<T>(sk_avx512::DenseQ8{{w, K}}, xf, bp, yp, M, N, K, sp);
    if (isa == ISA_AVX2) return direct_mm<T>(sk_avx2::DenseQ8{{w, K}}, xf, bp, yp, M, N, K, sp);
#endif
    direct_mm<T>(sk_scalar::DenseQ8{{w, K}}, xf, bp, yp, M, N, K, sp);
  });
}

// x [M, K] (fp32/bf16/fp16) -> fp32 [M, K + K/G]: per group its even columns, then its odd ones (the
// low and high nibbles of the packed bytes), then the K/G group sums (``quant.int4_direct_input``)
torch::Tensor int4_rearranged(const torch::Tensor& x, int64_t K, int64_t G) {
  const int64_t M = x.size(0), ldx = K + K / G, half = G / 2;
  auto xg = torch::empty({M, ldx}, x.options().dtype(at::kFloat));
  std::vector<float> keep;
  const float* xi = as_fp32(x, keep);
  float* o = xg.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K / G; ++g) {
      const float* src = xi + m * K + g * G;
      float* dst = o + m * ldx + g * G;
      float sum = 0.f;
      for (int64_t j = 0; j < half; ++j) {
        dst[j] = src[2 * j];
        dst[half + j] = src[2 * j + 1];
        sum += src[2 * j] + src[2 * j + 1];
      }
      o[m * ldx + K + g] = sum;
    }
  return xg;
}

// weight-only int4 (groups of G): x contiguous, either [M, K] (fp32/bf16/fp16, rearranged here into
// fp32) or already [M, K + K/G] fp32, each row per group as [even columns | odd columns] followed by
// its K/G group sums (``quant.int4_direct_input``); packed uint8 [N, K/2], sz fp32 [K/G, N, 2]
// contiguous, bias [N] (x's dtype) or None -> y [M, N] in x's dtype
torch::Tensor mm_q4(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, c10::optional<torch::Tensor> bias,
                    int64_t G, int64_t isa) {
  isa = check_isa(isa);
  TORCH_CHECK(sz.scalar_type() == at::kFloat, "mm_q4: sz must be fp32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "mm_q4: packed must be uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = 2 * packed.size(1);
  TORCH_CHECK(G >= 32 && G % 32 == 0 && K % G == 0, "mm_q4: the group must be a multiple of 32 dividing K");
  TORCH_CHECK(x.dim() == 2 && (x.size(1) == K || x.size(1) == K + K / G) && x.is_contiguous(),
              "mm_q4: x must be [M, K] or (rearranged) [M, K + K/G], contiguous");
  TORCH_CHECK(x.size(1) == K || x.scalar_type() == at::kFloat, "mm_q4: a rearranged x must be fp32");
  const torch::Tensor xg = x.size(1) == K ? int4_rearranged(x, K, G) : x;
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == K / G && sz.size(1) == N && sz.size(2) == 2 && sz.is_contiguous(),
              "mm_q4: sz must be [K/G, N, 2] contiguous");
  TORCH_CHECK(packed.is_contiguous(), "mm_q4: packed must be contiguous");
  const int64_t M = xg.size(0), ldx = K + K / G;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* szp = sz.data_ptr<float>();
  return q8_direct(xg, bias, N, [&](auto tag, const float* xf, const auto* bp, auto* yp) {
    using T = decltype(tag);
#if SK_X86
    if (isa == ISA_AVX512) return direct_mm<T>(sk_avx512::DenseQ4{{w, szp, K, G, N}}, xf, bp, yp, M, N, ldx);
    if (isa == ISA_AVX2) return direct_mm<T>(sk_avx2::DenseQ4{{w, szp, K, G, N}}, xf, bp, yp, M, N, ldx);
#endif
    direct_mm<T>(sk_scalar::DenseQ4{{w, szp, K, G, N}}, xf, bp, yp, M, N, ldx);
  }, x.scalar_type());
}

// 2:4 + weight-only int8: x [..., K] (M rows; y [..., N]) (fp32/bf16/fp16), values int8 [N, K/2] and meta
// [N, ceil(K/8)] contiguous, scale fp32 [N], bias [N] (x's dtype) or None -> y [M, N] =
// x @ (scale[:, None] * decompress_24(values, meta)).T + bias; direct path only (the int8 values
// are widened to fp32 in registers, the row's scale applied once to its dot products)
torch::Tensor mm24_q8(torch::Tensor x, torch::Tensor values, torch::Tensor meta, torch::Tensor scale,
                      c10::optional<torch::Tensor> bias, int64_t isa) {
  if (const LeadingDims lead{x}; lead.nested())  // x [..., K]
    return lead.back(mm24_q8(lead.flat(), values, meta, scale, bias, isa));
  const int64_t requested = isa;
  isa = check_isa(isa);
  TORCH_CHECK(values.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "mm24_q8: values must be int8 and scale fp32");
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  const float* sp = scale.data_ptr<float>();
#if SK_X86
  if (requested == ISA_AVX512_BF16 && x.scalar_type() == at::kBFloat16)  // bf16 x: int8 values widened to bf16
    return direct_mm_nb<c10::BFloat16>(
        sk_avx512bf16::Sparse24Dot<int8_t>{{values.data_ptr<int8_t>(), meta.data_ptr<uint8_t>(), K}}, x, bias, N, K, sp);
#endif
  return q8_direct(x, bias, N, [&](auto tag, const float* xf, const auto* bp, auto* yp) {
    using T = decltype(tag);
    with_sparse24<int8_t>(isa, values, meta, K, [&](const auto& kern) {
      direct_mm<T>(kern, xf, bp, yp, M, N, K, sp);
      return 0;
    });
  });
}

// The quantized formats above their direct kernels' M: x [..., K] (M rows; y [..., N]) (fp32/bf16/fp16), bias
// [N] (x's dtype) or None -> y [M, N]; dequantized tiles of about tile_bytes (0: the default) each
// handed to ATen's GEMM; isa 0 scalar / 1 avx2 / 2 avx512. mm_q8_blas: q int8 [N, K], scale fp32 [N]. mm_q4_blas: packed uint8
// [N, K/2] (column 2j the low nibble), sz fp32 [K/G, N, 2] = (scale, zero). mm24_q8_blas: values
// int8 [N, K/2], meta uint8 [N, ceil(K/8)], scale fp32 [N]. Every tensor contiguous.
torch::Tensor mm_q8_blas(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                         int64_t isa, int64_t tile_bytes) {
  if (const LeadingDims lead{x}; lead.nested())  // x [..., K]
    return lead.back(mm_q8_blas(lead.flat(), q, scale, bias, isa, tile_bytes));
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "mm_q8_blas: q must be int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(),
              "mm_q8_blas: scale must be fp32 [N]");
  return quant_blas<DequantQ8>(x, bias, N, K, isa, tile_bytes, q.data_ptr<int8_t>(), scale.data_ptr<float>(), K);
}

torch::Tensor mm_q4_blas(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, c10::optional<torch::Tensor> bias,
                         int64_t G, int64_t isa, int64_t tile_bytes) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "mm_q4_blas: packed must be uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = 2 * packed.size(1);
  TORCH_CHECK(G >= 2 && G % 2 == 0 && K % G == 0, "mm_q4_blas: the group must be even and divide K");
  TORCH_CHECK(sz.scalar_type() == at::kFloat && sz.dim() == 3 && sz.size(0) == K / G && sz.size(1) == N &&
                  sz.size(2) == 2 && sz.is_contiguous(),
              "mm_q4_blas: sz must be fp32 [K/G, N, 2] contiguous");
  return quant_blas<DequantQ4>(x, bias, N, K, isa, tile_bytes, packed.data_ptr<uint8_t>(), sz.data_ptr<float>(), K, G, N);
}

torch::Tensor mm24_q8_blas(torch::Tensor x, torch::Tensor values, torch::Tensor meta, torch::Tensor scale,
                           c10::optional<torch::Tensor> bias, int64_t isa, int64_t tile_bytes) {
  if (const LeadingDims lead{x}; lead.nested())  // x [..., K]
    return lead.back(mm24_q8_blas(lead.flat(), values, meta, scale, bias, isa, tile_bytes));
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 2 && values.is_contiguous(),
              "mm24_q8_blas: values must be int8 [N, K/2]");
  const int64_t N = values.size(0), K = 2 * values.size(1);
  TORCH_CHECK(K % 4 == 0, "mm24_q8_blas: K must be a multiple of 4");
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == N && meta.size(1) == (K + 7) / 8 &&
                  meta.is_contiguous(),
              "mm24_q8_blas: meta must be uint8 [N, ceil(K/8)]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(),
              "mm24_q8_blas: scale must be fp32 [N]");
  return quant_blas<Dequant24Q8>(x, bias, N, K, isa, tile_bytes, values.data_ptr<int8_t>(), meta.data_ptr<uint8_t>(),
                                 scale.data_ptr<float>(), K);
}

// rows [n0, n0 + out.size(0)) of the dense weight into out [rows, K] (contiguous)
void decompress24_rows(torch::Tensor values, torch::Tensor meta, int64_t n0, torch::Tensor out, int64_t isa) {
  isa = check_isa(isa);
  const int64_t rows = out.size(0), K = out.size(1);
  dispatch_dtype(values.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    with_sparse24<T>(isa, values, meta, K, [&](const auto& kern) {
      run_decompress<T>(kern, n0, rows, K, out.data_ptr<T>());
      return 0;
    });
  });
}

int64_t cpu_isa_supported() { return isa_supported(); }

// which half-precision dtypes every blas path multiplies in fp32: bit 0 bf16, bit 1 fp16; returns
// the mask it replaces
int64_t set_blas_fp32_dtypes(int64_t mask) {
  TORCH_CHECK(mask >= 0 && mask <= 3, "set_blas_fp32_dtypes: mask must be 0..3 (bit 0 bf16, bit 1 fp16), got ",
              mask);
  return g_blas_fp32_dtypes.exchange(mask);
}
