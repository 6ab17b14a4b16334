// sparsekit's CPU kernels, part 1 of 5: what the 2:4, bitmap and attention kernels share.
//
// The four files are joined into one translation unit, in this order: cpu_common.cpp,
// sparse24_cpu.cpp, bitmap_cpu.cpp, attention_cpu.cpp (sparsekit/kernels/cpu_ext.py, CPP_SOURCES),
// so the torch headers are parsed once.
//
// Every kernel but attention_cpu.cpp's (bf16 at level 3, fp32 at level 1 and up; elsewhere the
// caller keeps ATen's SDPA)
// exists for three x86-64 ISA levels in one binary: scalar (the baseline x86-64
// the file is compiled for: no hand-written SIMD), AVX2 + FMA + F16C, and AVX-512 (F, BW, VL).
// The AVX2 and AVX-512 code sits between SK_BEGIN_AVX2 / SK_BEGIN_AVX512 and SK_END_ISA, which set
// the compiler's target for those functions only (GCC `#pragma GCC target`, clang
// `#pragma clang attribute`): the AVX2 code can hold no AVX-512 instruction, and every path can be
// forced, tested and measured on a machine that runs them all. The caller passes the ISA
// (0 scalar, 1 avx2, 2 avx512, 3 avx512-bf16); cpu_isa_supported() says what this CPU runs. Level 3 is
// level 2 plus AVX512_BF16 (vdpbf16ps) and AVX512_VBMI2 (vpexpandw): it runs the AVX-512 kernels
// except where a kernel has a bf16-dot variant (2:4 and bitmap, bf16, direct path), so level 2
// stays testable on a CPU that has level 3.
//
// Two ways to multiply, for every format and ISA:
//   direct  x [M, K] fp32 against the compressed rows, never building a dense weight (decode and
//           small batches: one pass over the compressed bytes);
//   blas    decompress about TILE_BYTES of weight rows at a time into a per-thread buffer (kept
//           between calls) and hand each tile to ATen's dense GEMM (MKL / oneDNN, AMX for bf16 where the CPU has it), the
//           tiles spread over threads; no dense copy of the whole weight is ever held.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SK_X86 1
#else
#define SK_X86 0
#endif

#if SK_X86 && defined(__clang__)
#define SK_BEGIN_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,bmi,bmi2,popcnt\"))), apply_to = function)")
#define SK_BEGIN_AVX512                                                                                  \
  _Pragma(                                                                                               \
      "clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt\"))), " \
      "apply_to = function)")
#define SK_BEGIN_AVX512BF16                                                                              \
  _Pragma(                                                                                               \
      "clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,avx2,fma,f16c,bmi,bmi2,popcnt\"))), " \
      "apply_to = function)")
#define SK_END_ISA _Pragma("clang attribute pop")
#elif SK_X86
#define SK_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,popcnt\")")
#define SK_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt\")")
#define SK_BEGIN_AVX512BF16 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,avx2,fma,f16c,bmi,bmi2,popcnt\")")
#define SK_END_ISA _Pragma("GCC pop_options")
#endif

namespace {

enum Isa : int64_t { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_BF16 = 3 };
enum Path : int64_t { PATH_DIRECT = 0, PATH_BLAS = 1 };

constexpr int PF_BYTES = 2048;          // software prefetch distance along a weight stream
// decompressed weight rows per GEMM call (a SmolLM2 layer is one tile per thread): 0.5 MiB tiles
// ran 2:4 at M = 64-512 up to 40% slower on a Xeon with AMX, the GEMM per tile too small to run at
// speed (bench/blas_tiles.py, docs/data/blas-tiles.md)
constexpr int64_t TILE_BYTES = 8 << 20;

int64_t isa_supported() {
#if SK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    // Zen 4 and Sapphire Rapids have both; Cooper Lake (BF16 without VBMI2) stays at level 2
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2") ? ISA_AVX512_BF16
                                                                                         : ISA_AVX512;
  // every AVX2 CPU (Haswell, Zen 1 and later) also has F16C
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
  return ISA_SCALAR;
}

// checks that this CPU runs ISA level isa; returns the level of the kernels that have no bf16-dot
// variant (3 -> 2)
int64_t check_isa(int64_t isa) {
  TORCH_CHECK(isa >= ISA_SCALAR && isa <= ISA_AVX512_BF16, "sparsekit CPU kernel: isa must be 0, 1, 2 or 3, got ",
              isa);
  TORCH_CHECK(isa <= isa_supported(), "sparsekit CPU kernel: this CPU does not run ISA level ", isa,
              " (it runs up to ", isa_supported(), "); choose a lower one (SPARSEKIT_CPU_ISA / isa=)");
  return std::min<int64_t>(isa, ISA_AVX512);
}

template <typename Fn>
void dispatch_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "sparsekit CPU kernel: fp32/bf16/fp16 only, got ", t);
  }
}

// ------------------------------------------------------------------------- direct path driver
// Kern (one per format, ISA and dtype) provides
//   static constexpr int MB                    rows of x per pass (accumulators in registers)
//   template <int R> void dot(n, x, ldx, acc)  acc[r] = sum_k x[r * ldx + k] * W[n, k], r < R
//   double row_bytes() const                   compressed bytes of one weight row
// T is the output's (and bias's) dtype; the kernel's stored values may be another (int8).
// scale [N] fp32 or nullptr: y[m, n] = scale[n] * acc + bias[n] (per-row weight-only quantization)
// whether Kern sets PAIRED_DECODE and provides void dot2(n, x, acc) const: weight rows n and n + 1
// against one row of x (acc[0], acc[1]), which a decode step (M = 1) runs in place of two dot<1>
template <typename Kern>
constexpr bool paired_decode() {
  if constexpr (requires { Kern::PAIRED_DECODE; }) return Kern::PAIRED_DECODE;
  return false;
}

template <typename T, typename Kern, int R, typename X>
void rows_block(const Kern& kern, const X* x, int64_t K, const T* bias, const float* scale, T* y, int64_t N,
                int64_t m0, int64_t n0, int64_t n1) {
  float acc[R];
  int64_t n = n0;
  if constexpr (R == 1 && paired_decode<Kern>()) {
    for (; n + 2 <= n1; n += 2) {
      float pair[2];
      kern.dot2(n, x + m0 * K, pair);
      for (int j = 0; j < 2; ++j)
        y[m0 * N + n + j] = static_cast<T>((scale ? scale[n + j] : 1.f) * pair[j] +
                                           (bias ? static_cast<float>(bias[n + j]) : 0.f));
    }
  }
  for (; n < n1; ++n) {
    kern.template dot<R>(n, x + m0 * K, K, acc);
    const float b = bias ? static_cast<float>(bias[n]) : 0.f;
    const float s = scale ? scale[n] : 1.f;
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = static_cast<T>(s * acc[r] + b);
  }
}

template <typename T, typename Kern, int R, typename X>
void rows_block_any(int64_t rows, const Kern& kern, const X* x, int64_t K, const T* bias, const float* scale,
                    T* y, int64_t N, int64_t m0, int64_t n0, int64_t n1) {
  if constexpr (R > 1) {
    if (rows < R) return rows_block_any<T, Kern, R - 1>(rows, kern, x, K, bias, scale, y, N, m0, n0, n1);
  }
  rows_block<T, Kern, R>(kern, x, K, bias, scale, y, N, m0, n0, n1);
}

// The direct paths' tiling: tiles of weight rows (about 32 KiB compressed, a multiple of align
// rows) are re-read from cache by every pass of mb rows of x, so the weight streams from DRAM once
// whatever M is; each task streams at least about 64 KiB. fn(rows, m0, n0, n1) runs one pass.
template <typename Fn>
void for_each_tile_pass(int64_t N, int64_t M, double row_bytes, int64_t align, int64_t mb, Fn&& fn) {
  const int64_t bytes = std::max<int64_t>(1, int64_t(row_bytes));
  const int64_t grain = std::max<int64_t>(align, (64 * 1024) / bytes / align * align);
  const int64_t tile_rows = std::max<int64_t>(align, (32 * 1024) / bytes / align * align);
  at::parallel_for(0, N, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t n0 = c0; n0 < c1; n0 += tile_rows) {
      const int64_t n1 = std::min<int64_t>(c1, n0 + tile_rows);
      for (int64_t m0 = 0; m0 < M; m0 += mb) fn(std::min<int64_t>(mb, M - m0), m0, n0, n1);
    }
  });
}

// whether Kern provides void prepare_x(const float* x, float* out) const: the layout of one row of x
// [K] its dot() reads (the AVX2 2:4 kernel's), built once per row and call by direct_mm
template <typename Kern, typename = void>
struct has_prepare_x : std::false_type {};
template <typename Kern>
struct has_prepare_x<Kern, std::void_t<decltype(&Kern::prepare_x)>> : std::true_type {};

// y [M, N] = x [M, K] (fp32) @ W.T + bias, one weight row per kernel call
template <typename T, typename Kern, typename X>
void direct_mm(const Kern& kern, const X* x, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
               const float* scale = nullptr) {
  std::vector<float> laid;
  if constexpr (has_prepare_x<Kern>::value) {
    laid.resize(size_t(M) * K);
    for (int64_t m = 0; m < M; ++m) kern.prepare_x(x + m * K, laid.data() + m * K);
    x = laid.data();
  }
  for_each_tile_pass(N, M, kern.row_bytes(), 1, Kern::MB, [&](int64_t rows, int64_t m0, int64_t n0, int64_t n1) {
    rows_block_any<T, Kern, Kern::MB>(rows, kern, x, K, bias, scale, y, N, m0, n0, n1);
  });
}

// ------------------------------------------------------------------------- direct path, NB rows per call
// Kern (the bf16-dot kernels) provides
//   static constexpr int NB, MB                 weight rows per call, rows of x per pass
//   template <int NR, int R> void dot(n, x, ldx, float (*acc)[R])
//       acc[j][r] = sum_k x[r * ldx + k] * W[n + j, k], j < NR (NB, or 1 for the last rows), r < R
//   double row_bytes() const
// x, y and bias are T (the kernel reads x as it is: no fp32 copy); scale [N] fp32 or nullptr:
// y[m, n] = scale[n] * acc + bias[n] (per-row weight-only quantization)
template <typename T, typename Kern, int R>
void rows_block_nb(const Kern& kern, const T* x, int64_t K, const T* bias, const float* scale, T* y, int64_t N,
                   int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NB = Kern::NB;
  float acc[NB][R];
  const T* xm = x + m0 * K;
  auto put = [&](int64_t n, int count) {
    for (int j = 0; j < count; ++j) {
      const float b = bias ? static_cast<float>(bias[n + j]) : 0.f;
      const float s = scale ? scale[n + j] : 1.f;
      for (int r = 0; r < R; ++r) y[(m0 + r) * N + n + j] = static_cast<T>(s * acc[j][r] + b);
    }
  };
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    kern.template dot<NB, R>(n, xm, K, acc);
    put(n, NB);
  }
  for (; n < n1; ++n) {
    kern.template dot<1, R>(n, xm, K, acc);
    put(n, 1);
  }
}

template <typename T, typename Kern, int R>
void rows_block_nb_any(int64_t rows, const Kern& kern, const T* x, int64_t K, const T* bias, const float* scale,
                       T* y, int64_t N, int64_t m0, int64_t n0, int64_t n1) {
  if constexpr (R > 1) {
    if (rows < R) return rows_block_nb_any<T, Kern, R - 1>(rows, kern, x, K, bias, scale, y, N, m0, n0, n1);
  }
  rows_block_nb<T, Kern, R>(kern, x, K, bias, scale, y, N, m0, n0, n1);
}

// y [M, N] = x [M, K] @ W.T + bias: direct_mm's tiling, NB weight rows per kernel call
template <typename T, typename Kern>
torch::Tensor direct_mm_nb(const Kern& kern, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias,
                           int64_t N, int64_t K, const float* scale = nullptr) {
  at::NoGradGuard no_grad;
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const T* xp = x.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  auto pass = [&](int64_t rows, int64_t m0, int64_t n0, int64_t n1) {
    rows_block_nb_any<T, Kern, Kern::MB>(rows, kern, xp, K, bp, scale, yp, N, m0, n0, n1);
  };
  for_each_tile_pass(N, M, kern.row_bytes(), Kern::NB, Kern::MB, pass);
  return y;
}

// A per-thread buffer of n elements of T for the decompressed tile, kept between calls up to
// SCRATCH_KEEP bytes: a fresh allocation of a tile this size is an mmap whose page faults cost
// more than the tile's decompression.
constexpr size_t SCRATCH_KEEP = size_t(16) << 20;

template <typename T>
torch::Tensor scratch(int64_t n) {
  thread_local std::vector<char> keep;
  const size_t bytes = size_t(n) * sizeof(T);
  auto opts = torch::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  if (bytes > SCRATCH_KEEP) return torch::empty({n}, opts);
  if (keep.size() < bytes) keep.resize(bytes);
  return torch::from_blob(keep.data(), {n}, opts);
}

// rows per blas tile: at most about tile_bytes of dense rows of elem bytes, a multiple of 16, and a
// tile count that is a multiple of the threads (no thread idles on the last round)
inline int64_t blas_tile_rows(int64_t N, int64_t K, int64_t elem, int64_t tile_bytes) {
  const int64_t threads = at::get_num_threads();
  const int64_t most = std::max<int64_t>(16, tile_bytes / std::max<int64_t>(1, K * elem));
  int64_t tiles = (N + most - 1) / most;
  tiles = (tiles + threads - 1) / threads * threads;
  return std::min<int64_t>(N, ((N + tiles - 1) / tiles + 15) / 16 * 16);
}

// the blas path with the GEMM in fp32 for a half-precision T (see g_blas_fp32_dtypes below)
template <typename T, typename Kern>
torch::Tensor blas_mm_fp32(const Kern& kern, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias,
                           int64_t N, int64_t K, int64_t tile_bytes) {
  const int64_t M = x.size(0);
  const auto x32 = x.to(at::kFloat);
  auto y32 = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const int64_t tile = blas_tile_rows(N, K, sizeof(float), tile_bytes);
  const int64_t tiles = (N + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::NoGradGuard no_grad;
    torch::Tensor w = scratch<T>(tile * K).view({tile, K});
    torch::Tensor w32 = scratch<float>(tile * K).view({tile, K});
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, rows = std::min<int64_t>(tile, N - n0);
      kern.decompress(n0, n0 + rows, w.data_ptr<T>());
      auto wt = w32.narrow(0, 0, rows).copy_(w.narrow(0, 0, rows)).t();
      auto o = y32.narrow(1, n0, rows);
      at::mm_out(o, x32, wt);
    }
  });
  if (bias.has_value()) y32.add_(bias->to(at::kFloat));
  return y32.to(x.scalar_type());
}

// ------------------------------------------------------------------------- blas path driver
// Which half-precision dtypes the blas path multiplies in fp32 (bit 0 bf16, bit 1 fp16): on a CPU
// where ATen has no native bf16 / fp16 GEMM (oneDNN runs them only with AVX-512 or AMX), its GEMM
// in those dtypes is several times slower than in fp32 (an AVX2-only Zen 3: bf16 8.9x at M = 512).
// Set once at load from Python (sparsekit.kernels.cpu_ext), changeable for tests and benchmarks.
std::atomic<int64_t> g_blas_fp32_dtypes{0};

template <typename T>
bool blas_in_fp32() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return g_blas_fp32_dtypes.load(std::memory_order_relaxed) & 1;
  if constexpr (std::is_same_v<T, c10::Half>) return g_blas_fp32_dtypes.load(std::memory_order_relaxed) & 2;
  return false;
}

// Kern provides void decompress(n0, n1, T* out): dense rows [n0, n1) into out [n1 - n0, K].
// Each task decompresses tiles of weight rows into its own buffer and calls ATen's GEMM on them
// (single-threaded inside the parallel region), writing straight into y's columns of the tile.
// Where blas_in_fp32<T>(): x and each tile are widened to fp32 (exact), the GEMM runs in fp32 and
// y is rounded to T once at the end.
template <typename T, typename Kern>
torch::Tensor blas_mm(const Kern& kern, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, int64_t N,
                      int64_t K, int64_t tile_bytes = TILE_BYTES) {
  const int64_t M = x.size(0);
  if (blas_in_fp32<T>()) return blas_mm_fp32<T>(kern, x, bias, N, K, tile_bytes);
  auto y = torch::empty({M, N}, x.options());
  const int64_t tile = blas_tile_rows(N, K, sizeof(T), tile_bytes);
  const int64_t tiles = (N + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: the pool's threads need their own guard
    torch::Tensor w = scratch<T>(tile * K).view({tile, K});
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, rows = std::min<int64_t>(tile, N - n0);
      kern.decompress(n0, n0 + rows, w.data_ptr<T>());
      auto wt = w.narrow(0, 0, rows).t();
      auto o = y.narrow(1, n0, rows);  // y's columns [n0, n0 + rows): row stride N, the GEMM's ldc
      if (bias.has_value())
        at::addmm_out(o, bias->narrow(0, n0, rows), x, wt);
      else
        at::mm_out(o, x, wt);
    }
  });
  return y;
}

// x [..., K] with any leading dims and strides, as the entry points take it (the bound layers call
// them without two Python reshapes per call): nested() when it is not already a contiguous [M, K],
// flat() that matrix, back(y) y [M, N] as [..., N] (a view)
struct LeadingDims {
  const torch::Tensor& x;
  bool nested() const {
    TORCH_CHECK(x.dim() >= 1, "sparsekit CPU kernel: x must be [..., K], got a 0-d tensor");
    return x.dim() != 2 || !x.is_contiguous();
  }
  torch::Tensor flat() const { return x.reshape({-1, x.size(-1)}).contiguous(); }
  torch::Tensor back(const torch::Tensor& y) const {
    auto sizes = x.sizes().vec();
    sizes.back() = y.size(-1);
    return y.view(sizes);
  }
};

// x [M, K] contiguous (fp32 / bf16 / fp16) as fp32: x's own data, or a copy widened by hand in keep
// (no ATen op per call)
inline const float* as_fp32(const torch::Tensor& x, std::vector<float>& keep) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  keep.resize(size_t(x.numel()));
  auto widen = [&](const auto* p) {
    for (size_t i = 0; i < keep.size(); ++i) keep[i] = static_cast<float>(p[i]);
  };
  if (x.scalar_type() == at::kBFloat16)
    widen(x.data_ptr<c10::BFloat16>());
  else if (x.scalar_type() == at::kHalf)
    widen(x.data_ptr<c10::Half>());
  else
    TORCH_CHECK(false, "sparsekit CPU kernel: fp32/bf16/fp16 only, got ", x.scalar_type());
  return keep.data();
}

template <typename T, typename Kern>
torch::Tensor run_mm(const Kern& kern, const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, int64_t N,
                     int64_t K, int64_t path, int64_t tile_bytes = 0) {
  at::NoGradGuard no_grad;
  const int64_t M = x.size(0);
  if (M == 0 || N == 0) return torch::empty({M, N}, x.options());
  if (path == PATH_BLAS) return blas_mm<T>(kern, x, bias, N, K, tile_bytes > 0 ? tile_bytes : TILE_BYTES);
  auto y = torch::empty({M, N}, x.options());
  std::vector<float> keep;  // M x K: small where direct runs
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  direct_mm<T>(kern, as_fp32(x, keep), bp, y.data_ptr<T>(), M, N, K);
  return y;
}

// dense rows [n0, n0 + rows) into out [rows, K], rows spread over threads
template <typename T, typename Kern>
void run_decompress(const Kern& kern, int64_t n0, int64_t rows, int64_t K, T* out) {
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * int64_t(sizeof(T))));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { kern.decompress(n0 + r0, n0 + r1, out + r0 * K); });
}

// ------------------------------------------------------------------------- typed vector loads
#if SK_X86
SK_BEGIN_AVX2
namespace sk_avx2 {
template <typename T> inline __m256 load8(const T* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <> inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline __m256 load8<int8_t>(const int8_t* p) {  // weight-only int8: exact in fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
template <typename T> inline void store8(T* p, __m256 v);
template <> inline void store8<float>(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
template <> inline void store8<c10::BFloat16>(c10::BFloat16* p, __m256 v) {
  // exact: every lane is a bf16 value or zero, so the low 16 bits are zero
  const __m256i s = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
template <> inline void store8<c10::Half>(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
}  // namespace sk_avx2
SK_END_ISA

SK_BEGIN_AVX512
namespace sk_avx512 {
template <typename T> inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <> inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <> inline __m512 load16<int8_t>(const int8_t* p) {  // weight-only int8: exact in fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// the first `count` (<= 16) elements, zeros above; never touches memory past them
template <typename T> inline __m512 load16_first(const T* p, int count);
template <> inline __m512 load16_first<float>(const float* p, int count) {
  return _mm512_maskz_loadu_ps(__mmask16(_bzhi_u32(0xFFFFu, count)), p);
}
template <> inline __m512 load16_first<c10::BFloat16>(const c10::BFloat16* p, int count) {
  const __m256i h = _mm256_maskz_loadu_epi16(__mmask16(_bzhi_u32(0xFFFFu, count)), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <> inline __m512 load16_first<c10::Half>(const c10::Half* p, int count) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16(_bzhi_u32(0xFFFFu, count)), p));
}
template <typename T> inline void store16(T* p, __m512 v);
template <> inline void store16<float>(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
template <> inline void store16<c10::BFloat16>(c10::BFloat16* p, __m512 v) {
  // exact: every lane is a bf16 value or zero, so the low 16 bits are zero
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}
template <> inline void store16<c10::Half>(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
}  // namespace sk_avx512
SK_END_ISA
#endif  // SK_X86

}  // namespace
