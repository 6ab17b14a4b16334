// sparsekit's CPU kernels, part 5 of 5: the layers' entries as dispatcher ops with C++ kernels.
//
// A compiled model calls one op per layer and token. An op whose CPU kernel is Python pays for
// the way back into the interpreter on every call (about 20 us at M = 1 on Zen 3,
// docs/data/op-overhead.md); these ops run their C++ kernel straight from the dispatcher. Each
// takes its route as arguments the caller computes once, when it traces: the ISA level, the
// elements of x up to which the direct kernel runs (above: decompressed tiles + GEMM) and the
// tile size. Inputs are checked by the caller (``sparse24_mm``, ``bitmap_mm``, ``int8_mm``,
// ``sparse24_int8_mm``), as for the functions above.

#include <torch/library.h>

namespace {

// bias in x's dtype and contiguous, as the blas entries take it
c10::optional<torch::Tensor> bias_like(const c10::optional<torch::Tensor>& bias, const torch::Tensor& x) {
  if (!bias.has_value()) return bias;
  return bias->to(x.scalar_type()).contiguous();
}

c10::optional<torch::Tensor> contiguous(const c10::optional<torch::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->contiguous();
}

torch::Tensor scale_fp32(const torch::Tensor& scale) { return scale.to(at::kFloat).contiguous(); }

torch::Tensor mm24_routed(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& meta,
                          const c10::optional<torch::Tensor>& bias, int64_t isa, int64_t direct_numel,
                          int64_t tile_bytes) {
  return mm24(x, values.contiguous(), meta.contiguous(), contiguous(bias), isa,
              x.numel() > direct_numel ? PATH_BLAS : PATH_DIRECT, tile_bytes);
}

torch::Tensor bitmap_routed(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& mask_bits,
                            const torch::Tensor& offsets, const c10::optional<torch::Tensor>& bias, int64_t isa,
                            int64_t direct_numel, int64_t tile_bytes) {
  return mm_bitmap(x, values.contiguous(), mask_bits.contiguous(), offsets.contiguous(), contiguous(bias), isa,
                   x.numel() > direct_numel ? PATH_BLAS : PATH_DIRECT, tile_bytes);
}

torch::Tensor q8_routed(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                        const c10::optional<torch::Tensor>& bias, int64_t isa, int64_t direct_numel,
                        int64_t tile_bytes) {
  const torch::Tensor qc = q.contiguous();
  if (x.numel() > direct_numel) return mm_q8_blas(x, qc, scale_fp32(scale), bias_like(bias, x), isa, tile_bytes);
  return mm_q8(x, qc, scale_fp32(scale), bias_like(bias, x), isa);
}

torch::Tensor mm24_q8_routed(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& meta,
                             const torch::Tensor& scale, const c10::optional<torch::Tensor>& bias, int64_t isa,
                             int64_t direct_numel, int64_t tile_bytes) {
  const torch::Tensor v = values.contiguous(), m = meta.contiguous();
  if (x.numel() > direct_numel) return mm24_q8_blas(x, v, m, scale_fp32(scale), bias_like(bias, x), isa, tile_bytes);
  return mm24_q8(x, v, m, scale_fp32(scale), contiguous(bias), isa);
}

}  // namespace

// defines the routed ops in namespace ns (``sparsekit``) with their CPU kernels; the library stays
// registered for the life of the process. Called once, by the loader of the main build.
void register_ops(std::string ns) {
  static std::vector<std::unique_ptr<torch::Library>> keep;
  auto lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, ns, c10::nullopt, __FILE__, __LINE__);
  const std::string route = "int isa, int direct_numel, int tile_bytes) -> Tensor";
  for (const std::string head : {"mm24_routed(Tensor x, Tensor values, Tensor meta, Tensor? bias, ",
                                 "bitmap_routed(Tensor x, Tensor values, Tensor mask_bits, Tensor offsets, Tensor? bias, ",
                                 "q8_routed(Tensor x, Tensor q, Tensor scale, Tensor? bias, ",
                                 "mm24_q8_routed(Tensor x, Tensor values, Tensor meta, Tensor scale, Tensor? bias, "})
    lib->def((head + route).c_str());
  lib->impl("mm24_routed", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(mm24_routed)));
  lib->impl("bitmap_routed", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(bitmap_routed)));
  lib->impl("q8_routed", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(q8_routed)));
  lib->impl("mm24_q8_routed", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(mm24_q8_routed)));
  keep.push_back(std::move(lib));
}
