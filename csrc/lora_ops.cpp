// C++ CPU operators of fastlora, registered as `fastlora_cpp::*` (CPU dispatch key) and called by
// fastlora/backends/cpp.py, which the `fastlora::*` CPU kernels route to for backend "cpp".
// Signatures mirror fastlora/backends/reference.py; dropout takes host-computed thresholds and scales.
//
// Strategy: computed in fp32 (bf16/fp16 inputs are upcast once: on AVX2-only CPUs fp32 GEMM is several times
// faster than bf16 GEMM; the thin LoRA products widen bf16/fp16 x and dy block by block, half_thin.cpp), except on
// the "half" path (lora_half.cpp), which the run-time choice offers where the CPU multiplies bf16/fp16 natively:
// there the base GEMM runs in x's dtype and the fp32 LoRA term is added to it block by block. The base product comes first, written
// fresh, and the thin LoRA term is accumulated into it. How W reaches the base product depends on its kind and M:
// - dense fp32 W: handed to BLAS as it is (also a strided view, e.g. a GPT-2 Conv1D weight transposed);
// - bitsandbytes 8-bit W (int8 codes, per-row scales): converted like NF4 below, whole or by panels;
// - NF4 W and at most a few tokens (decode): fused row kernels (nf4_gemv.h) read the 4-bit codes once and
//   multiply in L1; W is never written out in fp32;
// - otherwise, when its fp32 copy fits the whole-weight limit: W is converted in one pass (both cores) into a
//   reused per-thread buffer and fed to one GEMM, as the split practice does, without its allocation;
// - larger W: converted panel by panel into that buffer, each panel's GEMM accumulating into its output tile.
// Beating MKL's GEMM by hand is not the aim: feeding it the weight cheaply is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

#include "base_weight.h"
#include "dropout_passes.h"
#include "half_thin.h"
#include "half_thin_avx512.h"
#include "lora_half.h"
#include "lora_ops.h"

namespace fastlora {
namespace {

// Bytes of one dequantized fp32 panel. Each panel is one BLAS call, which repacks the activations, so panels
// must be large enough to amortize that, yet small enough to stay in the last-level cache.
constexpr int64_t kDefaultPanelBytes = 8 << 20;
std::atomic<int64_t> panel_bytes{kDefaultPanelBytes};
// Largest fp32 copy of W kept whole: below it a non-fp32 W (NF4, bf16, fp16) is converted in one pass into a
// reused per-thread buffer and fed to a single GEMM (what the split practice does, minus its allocation);
// above it, panel by panel. One GEMM call over all of W is the fastest at every size measured that fits.
constexpr int64_t kDefaultWholeWeightBytes = 64 << 20;
std::atomic<int64_t> whole_weight_bytes{kDefaultWholeWeightBytes};
// Up to this many tokens an NF4 W is never written out in fp32: the fused row kernels of nf4_gemv.h read the
// codes once and multiply in L1 (decode sizes, where dequantize + BLAS costs about twice as much).
constexpr int64_t kDefaultFusedTokens = 4;
std::atomic<int64_t> fused_tokens{kDefaultFusedTokens};
// Up to this many elements of dy, lora_up_grad computes dB as dy^T @ S (see there).
constexpr int64_t kTransposedUpGradElements = 512 * 1536;

// Panel extent along one axis of the weight when the other axis has `other` elements.
int64_t panel_extent(int64_t other, int64_t total) {
  const int64_t fit = panel_bytes.load(std::memory_order_relaxed) / (static_cast<int64_t>(sizeof(float)) * std::max<int64_t>(other, 1));
  const int64_t aligned = std::max(kPanelAlign, fit / kPanelAlign * kPanelAlign);
  return std::min(aligned, total);
}

bool whole_weight_fits(int64_t n, int64_t k) {
  return n * k * static_cast<int64_t>(sizeof(float)) <= whole_weight_bytes.load(std::memory_order_relaxed);
}


// How a non-fp32 W reaches the base product: the `path` argument of lora_linear / lora_linear_grad_input.
// kAuto picks by the thresholds above; the others are what fastlora/tuning.py times and chooses between. kHalf
// multiplies in x's dtype (bf16/fp16, lora_half.cpp), the others in fp32.
enum BasePath : int64_t { kAuto = 0, kFused = 1, kWhole = 2, kPanels = 3, kHalf = 4 };

BasePath chosen_path(const BaseWeight& base, int64_t path, int64_t tokens, int64_t n, int64_t k) {
  TORCH_CHECK(path >= kAuto && path <= kHalf, "unknown base path ", path,
              " (0 auto, 1 fused, 2 whole, 3 panels, 4 half)");
  if (path == kAuto) {
    if (base.fused_for(tokens, fused_tokens.load(std::memory_order_relaxed))) return kFused;
    return n > 0 && k > 0 && whole_weight_fits(n, k) ? kWhole : kPanels;
  }
  TORCH_CHECK(path != kFused || base.has_fused_kernels(), "the fused path needs a non-empty NF4 weight");
  // An empty W has nothing to convert: the panel loop handles it (no panels at all).
  return path == kWhole && (n == 0 || k == 0) ? kPanels : static_cast<BasePath>(path);
}

// Host-side dropout parameters of one call: per adapter, its slice of the stacked rank and its mask.
struct Adapters {
  std::vector<int64_t> offsets, ranks;
  std::vector<std::optional<DropoutMask>> masks;  // nullopt: no dropout (p == 0)

  Adapters(at::IntArrayRef ranks_, const at::Tensor& seeds, at::IntArrayRef thresholds,
           at::ArrayRef<double> keep_scales) {
    TORCH_CHECK(thresholds.size() == ranks_.size() && keep_scales.size() == ranks_.size(),
                "one dropout threshold and scale per adapter");
    at::Tensor seeds64;  // read only when some adapter drops out
    int64_t offset = 0;
    for (size_t i = 0; i < ranks_.size(); ++i) {
      offsets.push_back(offset);
      ranks.push_back(ranks_[i]);
      offset += ranks_[i];
      const bool active = thresholds[i] != 0 || keep_scales[i] != 1.0;
      if (active) {
        if (!seeds64.defined()) {
          seeds64 = seeds.to(at::kLong).contiguous();
        }
        TORCH_CHECK(static_cast<int64_t>(i) < seeds64.numel(), "no seed for adapter ", i);
        masks.emplace_back(DropoutMask(seeds64.data_ptr<int64_t>()[i], thresholds[i], keep_scales[i]));
      } else {
        masks.emplace_back(std::nullopt);
      }
    }
  }

  bool any_dropout() const {
    return std::any_of(masks.begin(), masks.end(), [](const auto& m) { return m.has_value(); });
  }
};

at::Tensor to_dtype(const at::Tensor& t32, at::ScalarType dtype) {
  return dtype == at::kFloat ? t32 : t32.to(dtype);
}

// t[:, adapter i's columns] *= lora_scales[i] on a thin fp32 [M, R] result (a scale of 1 costs nothing).
void scale_adapter_columns(at::Tensor& t, at::IntArrayRef ranks, at::ArrayRef<double> lora_scales) {
  TORCH_CHECK(lora_scales.size() == ranks.size(), "one LoRA scale per adapter");
  if (ranks.size() == 1) {  // one adapter: every column, no narrow view to build
    if (lora_scales[0] != 1.0) t.mul_(lora_scales[0]);
    return;
  }
  int64_t start = 0;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (lora_scales[i] != 1.0) {
      t.narrow(1, start, ranks[i]).mul_(lora_scales[i]);
    }
    start += ranks[i];
  }
}

}  // namespace

// The half path's panel extent along `total` (0: W whole): its copy of W (2 bytes an element) is kept whole under
// the same byte limit as the fp32 copy; its panels hold as many elements as the fp32 ones.
int64_t half_panel_extent(int64_t other, int64_t total) {
  const bool whole = other * total * 2 <= whole_weight_bytes.load(std::memory_order_relaxed);
  return whole || other == 0 || total == 0 ? 0 : panel_extent(other, total);
}

at::Tensor nf4_resolve_absmax(const at::Tensor& absmax_q, const at::Tensor& code2, const at::Tensor& absmax2,
                              int64_t blocksize2, double offset) {
  const NoAutocast fp32_compute;
  const at::Tensor q = absmax_q.to(at::kByte).contiguous();
  const at::Tensor code = as_f32(code2), scale2 = as_f32(absmax2);
  TORCH_CHECK(code.numel() == 256, "code2 must have 256 entries");
  TORCH_CHECK(blocksize2 > 0 && scale2.numel() * blocksize2 >= q.numel(), "absmax2 has too few blocks");
  at::Tensor out = at::empty({q.numel()}, q.options().dtype(at::kFloat));
  const uint8_t* codes = q.data_ptr<uint8_t>();
  const float* table = code.data_ptr<float>();
  const float* scales = scale2.data_ptr<float>();
  const float offset32 = static_cast<float>(offset);  // bitsandbytes adds an fp32 offset
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, q.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // product first, then the offset, each rounded to fp32 (built with -ffp-contract=off: no FMA)
      const float product = table[codes[i]] * scales[i / blocksize2];
      dst[i] = product + offset32;
    }
  });
  return out.view(absmax_q.sizes());
}

at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t n,
                          int64_t k, at::ScalarType dtype) {
  const NoAutocast fp32_compute;
  const BaseWeight weight(packed, absmax, blocksize, n, k);
  at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kFloat));
  if (n * k > 0) {
    weight.fill(0, 0, out);
  }
  return to_dtype(out, dtype);
}

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& lora_a, at::IntArrayRef ranks, const at::Tensor& seeds,
                     at::IntArrayRef thresholds, at::ArrayRef<double> keep_scales, at::ArrayRef<double> lora_scales) {
  const NoAutocast fp32_compute;
  const Adapters adapters(ranks, seeds, thresholds, keep_scales);
  const at::Tensor a32 = as_f32(lora_a);
  at::Tensor s32;
  if (!adapters.any_dropout() && is_half(x.scalar_type())) {
    s32 = half_times(x.contiguous(), a32.t());  // x converted block by block, never whole
  } else if (!adapters.any_dropout()) {
    s32 = at::mm(as_f32(x), a32.t());  // a view of A^T: measured as fast as or faster than a contiguous copy
  } else {
    const at::Tensor x32 = as_f32(x);
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < adapters.ranks.size(); ++i) {
      const at::Tensor a = a32.narrow(0, adapters.offsets[i], adapters.ranks[i]);
      const at::Tensor& mask_x = adapters.masks[i] ? dropped(x32, *adapters.masks[i]) : x32;
      parts.push_back(at::mm(mask_x, a.t()));
    }
    s32 = at::cat(parts, 1);
  }
  scale_adapter_columns(s32, ranks, lora_scales);
  return s32;
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& absmax,
                       int64_t blocksize, const std::optional<at::Tensor>& bias, const at::Tensor& lora_s,
                       const at::Tensor& lora_b, int64_t path, const std::optional<at::Tensor>& col_scale) {
  const NoAutocast fp32_compute;
  TORCH_CHECK(x.dim() == 2 && lora_s.dim() == 2 && lora_b.dim() == 2, "x, lora_s, lora_b must be matrices");
  const int64_t n = lora_b.size(0), k = x.size(1);
  const BaseWeight base(weight, absmax, blocksize, n, k);
  const at::Tensor s32 = as_f32(lora_s), b32 = as_f32(lora_b);
  const BasePath chosen = chosen_path(base, path, x.size(0), n, k);
  const bool half = chosen == kHalf && !base.is_dense_f32();  // a dense fp32 W is multiplied in fp32 regardless
  const bool scaled = col_scale.has_value();
  if (half && !scaled) {  // x W^T rounded to x's dtype, then (bias + S B^T) in fp32 added and the sum rounded
    at::Tensor y = half_forward(base, x.contiguous(), n, k, half_panel_extent(k, n));
    add_product_rounded(y, s32, b32.t(), bias.has_value() ? std::optional<at::Tensor>(as_f32(*bias)) : std::nullopt);
    return y;
  }
  const at::Tensor x32 = half ? at::Tensor() : as_f32(x);
  // The base product first, written fresh; the thin LoRA term then accumulates into it. MKL measured up to 9%
  // slower on the big GEMM when it accumulates into an existing output (beta = 1) than when it writes one.
  // With a column scale (DoRA's m / row norm) the bias joins after it: y = c * (x W^T + S B^T) + bias.
  const std::optional<at::Tensor> bias32 =
      bias.has_value() && !scaled ? std::optional<at::Tensor>(as_f32(*bias)) : std::nullopt;
  const auto product = [&](const at::Tensor& w_t) {
    return bias32.has_value() ? at::addmm(*bias32, x32, w_t) : at::mm(x32, w_t);
  };
  const auto bias_or_zeros = [&]() {
    // clone, not contiguous(): with one token the expanded bias already counts as contiguous and would alias it
    return bias32.has_value() ? bias32->expand({x32.size(0), n}).clone(at::MemoryFormat::Contiguous)
                              : at::zeros({x32.size(0), n}, x32.options());
  };
  at::Tensor y32;
  if (half) {  // with a column scale: the rounded base product continues in fp32
    y32 = half_forward(base, x.contiguous(), n, k, half_panel_extent(k, n)).to(at::kFloat);
  } else if (base.is_dense_f32()) {
    y32 = product(base.dense().t());
  } else if (chosen == kFused) {
    y32 = bias_or_zeros();
    base.fused_forward(x32, y32);
  } else if (chosen == kWhole) {
    at::Tensor w32 = scratch(n, k);
    base.fill(0, 0, w32);
    y32 = product(w32.t());
  } else {
    y32 = bias_or_zeros();
    const int64_t panel_rows = n > 0 && k > 0 ? panel_extent(k, n) : 0;
    at::Tensor buffer = panel_rows > 0 ? scratch(panel_rows, k) : at::Tensor();
    for (int64_t row0 = 0; row0 < n && panel_rows > 0; row0 += panel_rows) {
      const int64_t rows = std::min(panel_rows, n - row0);
      at::Tensor panel = buffer.narrow(0, 0, rows);
      base.fill(row0, 0, panel);
      y32.narrow(1, row0, rows).addmm_(x32, panel.t());
    }
  }
  y32.addmm_(s32, b32.t());
  if (scaled) {
    y32.mul_(as_f32(*col_scale));
    if (bias.has_value()) y32.add_(as_f32(*bias));
  }
  return to_dtype(y32, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> lora_up_grad(const at::Tensor& grad_out, const at::Tensor& lora_b,
                                                const at::Tensor& lora_s, at::IntArrayRef ranks,
                                                at::ArrayRef<double> lora_scales) {
  const NoAutocast fp32_compute;
  const at::Tensor s32 = as_f32(lora_s);
  if (is_half(grad_out.scalar_type()) && grad_out.size(0) > kFewRows) {  // dy converted block by block, never whole
    const at::Tensor dy = grad_out.contiguous();
    at::Tensor grad_s = half_times(dy, as_f32(lora_b));
    scale_adapter_columns(grad_s, ranks, lora_scales);
    return {grad_s, transposed_times_half(s32.contiguous(), dy).t().contiguous()};
  }
  const at::Tensor dy32 = as_f32(grad_out);
  at::Tensor grad_s = at::mm(dy32, as_f32(lora_b));
  scale_adapter_columns(grad_s, ranks, lora_scales);
  // For large dy MKL runs S^T @ dy (dy untransposed) up to 1.6x faster than dy^T @ S here, and transposing [R, N]
  // back is cheap; for smaller dy (below about 512 x 1536) dy^T @ S is faster, by 3x at a few tokens.
  if (dy32.numel() <= kTransposedUpGradElements) {
    return {grad_s, at::mm(dy32.t(), s32)};
  }
  return {grad_s, at::mm(s32.t(), dy32).t().contiguous()};
}

at::Tensor lora_down_grad(const at::Tensor& grad_s, const at::Tensor& x, at::IntArrayRef ranks,
                          const at::Tensor& seeds, at::IntArrayRef thresholds, at::ArrayRef<double> keep_scales) {
  const NoAutocast fp32_compute;
  const Adapters adapters(ranks, seeds, thresholds, keep_scales);
  const at::Tensor ds32 = as_f32(grad_s);
  if (!adapters.any_dropout()) {
    return is_half(x.scalar_type()) ? transposed_times_half(ds32.contiguous(), x.contiguous()) : at::mm(ds32.t(), as_f32(x));
  }
  const at::Tensor x32 = as_f32(x);
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < adapters.ranks.size(); ++i) {
    const at::Tensor ds = ds32.narrow(1, adapters.offsets[i], adapters.ranks[i]);
    const at::Tensor& mask_x = adapters.masks[i] ? dropped(x32, *adapters.masks[i]) : x32;
    parts.push_back(at::mm(ds.t(), mask_x));
  }
  return at::cat(parts, 0);
}

at::Tensor lora_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& absmax, int64_t blocksize,
                                  const at::Tensor& grad_s, const at::Tensor& lora_a, at::IntArrayRef ranks,
                                  const at::Tensor& seeds, at::IntArrayRef thresholds,
                                  at::ArrayRef<double> keep_scales, int64_t path) {
  const NoAutocast fp32_compute;
  TORCH_CHECK(grad_out.dim() == 2 && grad_s.dim() == 2 && lora_a.dim() == 2, "grad_out, grad_s, lora_a must be matrices");
  const int64_t n = grad_out.size(1), k = lora_a.size(1);
  const BaseWeight base(weight, absmax, blocksize, n, k);
  const Adapters adapters(ranks, seeds, thresholds, keep_scales);
  const at::Tensor ds32 = as_f32(grad_s), a32 = as_f32(lora_a);

  // The base product dy @ W first, written fresh (see lora_linear); then the LoRA term, masked per adapter.
  const int64_t m = grad_out.size(0);
  const BasePath chosen = chosen_path(base, path, m, n, k);
  const bool half = chosen == kHalf && !base.is_dense_f32();
  if (half && !adapters.any_dropout()) {  // dy W rounded to dy's dtype, then dS A in fp32 added and rounded
    at::Tensor dx = half_grad_input(base, grad_out.contiguous(), n, k, half_panel_extent(n, k));
    add_product_rounded(dx, ds32, a32, std::nullopt);
    return dx;
  }
  const at::Tensor dy32 = half ? at::Tensor() : as_f32(grad_out);
  at::Tensor dx32;
  if (half) {  // with dropout: the rounded base product continues in fp32, the masked terms added below
    dx32 = half_grad_input(base, grad_out.contiguous(), n, k, half_panel_extent(n, k)).to(at::kFloat);
  } else if (base.is_dense_f32()) {
    dx32 = at::mm(dy32, base.dense());
  } else if (chosen == kFused) {
    dx32 = at::zeros({m, k}, dy32.options());
    base.fused_grad_input(dy32, dx32);
  } else if (chosen == kWhole) {
    at::Tensor w32 = scratch(n, k);
    base.fill(0, 0, w32);
    dx32 = at::mm(dy32, w32);
  } else {
    dx32 = at::zeros({m, k}, dy32.options());
    // Column panels W[:, col0:col0+cols] make each panel's GEMM own a disjoint slice of dx.
    const int64_t panel_cols = n > 0 && k > 0 ? panel_extent(n, k) : 0;
    at::Tensor buffer = panel_cols > 0 ? scratch(n, panel_cols).view({-1}) : at::Tensor();
    for (int64_t col0 = 0; col0 < k && panel_cols > 0; col0 += panel_cols) {
      const int64_t cols = std::min(panel_cols, k - col0);
      at::Tensor panel = buffer.narrow(0, 0, n * cols).view({n, cols});
      base.fill(0, col0, panel);
      dx32.narrow(1, col0, cols).addmm_(dy32, panel);
    }
  }
  if (!adapters.any_dropout()) {
    dx32.addmm_(ds32, a32);
  } else {
    for (size_t i = 0; i < adapters.ranks.size(); ++i) {
      const at::Tensor ds = ds32.narrow(1, adapters.offsets[i], adapters.ranks[i]);
      const at::Tensor a = a32.narrow(0, adapters.offsets[i], adapters.ranks[i]);
      if (adapters.masks[i]) {
        add_masked(dx32, at::mm(ds, a), *adapters.masks[i]);
      } else {
        dx32.addmm_(ds, a);
      }
    }
  }
  return to_dtype(dx32, grad_out.scalar_type());
}

// Tuning and test knobs; each returns the previous setting.
int64_t set_panel_bytes(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "panel size must be positive");
  return panel_bytes.exchange(bytes);
}

int64_t set_whole_weight_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "whole-weight limit must be non-negative");
  return whole_weight_bytes.exchange(bytes);
}

int64_t set_fused_tokens(int64_t tokens) {
  TORCH_CHECK(tokens >= 0, "token limit must be non-negative");
  return fused_tokens.exchange(tokens);
}

bool set_avx2_enabled(bool enabled) { return avx2_enabled().exchange(enabled); }

bool has_avx2() { return cpu_has_avx2(); }

bool set_avx512_enabled(bool enabled) { return avx512_enabled().exchange(enabled); }

bool has_avx512() { return cpu_has_avx512(); }

}  // namespace fastlora

TORCH_LIBRARY(fastlora_cpp, m) {
  m.def("nf4_resolve_absmax(Tensor absmax_q, Tensor code2, Tensor absmax2, int blocksize2, float offset) -> Tensor");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, int n, int k, ScalarType dtype) -> Tensor");
  m.def("lora_down(Tensor x, Tensor lora_a, int[] ranks, Tensor seeds, int[] thresholds, float[] keep_scales, "
        "float[] lora_scales) -> Tensor");
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? absmax, int blocksize, Tensor? bias, Tensor lora_s, "
        "Tensor lora_b, int path=0, Tensor? col_scale=None) -> Tensor");
  m.def("lora_up_grad(Tensor grad_out, Tensor lora_b, Tensor lora_s, int[] ranks, float[] lora_scales) -> (Tensor, Tensor)");
  m.def("lora_down_grad(Tensor grad_s, Tensor x, int[] ranks, Tensor seeds, int[] thresholds, "
        "float[] keep_scales) -> Tensor");
  m.def("lora_linear_grad_input(Tensor grad_out, Tensor weight, Tensor? absmax, int blocksize, Tensor grad_s, "
        "Tensor lora_a, int[] ranks, Tensor seeds, int[] thresholds, float[] keep_scales, int path=0) -> Tensor");
  // Knobs without tensors have no dispatch key to route on: registered as plain (catch-all) functions.
  m.def("set_panel_bytes(int bytes) -> int", &fastlora::set_panel_bytes);
  m.def("set_whole_weight_bytes(int bytes) -> int", &fastlora::set_whole_weight_bytes);
  m.def("set_fused_tokens(int tokens) -> int", &fastlora::set_fused_tokens);
  m.def("set_avx2_enabled(bool enabled) -> bool", &fastlora::set_avx2_enabled);
  m.def("has_avx2() -> bool", &fastlora::has_avx2);
  m.def("set_avx512_enabled(bool enabled) -> bool", &fastlora::set_avx512_enabled);
  m.def("has_avx512() -> bool", &fastlora::has_avx512);
}

TORCH_LIBRARY_IMPL(fastlora_cpp, CPU, m) {
  m.impl("nf4_resolve_absmax", &fastlora::nf4_resolve_absmax);
  m.impl("nf4_dequantize", &fastlora::nf4_dequantize);
  m.impl("lora_down", &fastlora::lora_down);
  m.impl("lora_linear", &fastlora::lora_linear);
  m.impl("lora_up_grad", &fastlora::lora_up_grad);
  m.impl("lora_down_grad", &fastlora::lora_down_grad);
  m.impl("lora_linear_grad_input", &fastlora::lora_linear_grad_input);
}

// The same hot ops as plain Python functions for fastlora/backends/cpp.py: a direct pybind11 call costs ~1 us
// where a torch.ops call with list arguments costs ~15 us, more than the GEMMs of a decode-sized layer. Like the
// registered CPU kernels they run below autograd (their callers are autograd.Functions) and release the GIL.
namespace {
namespace py = pybind11;
using Ints = std::vector<int64_t>;
using Doubles = std::vector<double>;
using Tensor = at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "lora_down",
      [](const Tensor& x, const Tensor& a, const Ints& ranks, const Tensor& seeds, const Ints& thresholds,
         const Doubles& keep_scales, const Doubles& lora_scales) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        return fastlora::lora_down(x, a, ranks, seeds, thresholds, keep_scales, lora_scales);
      },
      no_gil);
  m.def(
      "lora_linear",
      [](const Tensor& x, const Tensor& weight, const OptionalTensor& absmax, int64_t blocksize,
         const OptionalTensor& bias, const Tensor& lora_s, const Tensor& lora_b, int64_t path,
         const OptionalTensor& col_scale) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        return fastlora::lora_linear(x, weight, absmax, blocksize, bias, lora_s, lora_b, path, col_scale);
      },
      no_gil);
  m.def(
      "lora_up_grad",
      [](const Tensor& grad_out, const Tensor& lora_b, const Tensor& lora_s, const Ints& ranks,
         const Doubles& lora_scales) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        return fastlora::lora_up_grad(grad_out, lora_b, lora_s, ranks, lora_scales);
      },
      no_gil);
  m.def(
      "lora_down_grad",
      [](const Tensor& grad_s, const Tensor& x, const Ints& ranks, const Tensor& seeds, const Ints& thresholds,
         const Doubles& scales) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        return fastlora::lora_down_grad(grad_s, x, ranks, seeds, thresholds, scales);
      },
      no_gil);
  m.def(
      "lora_linear_grad_input",
      [](const Tensor& grad_out, const Tensor& weight, const OptionalTensor& absmax, int64_t blocksize,
         const Tensor& grad_s, const Tensor& lora_a, const Ints& ranks, const Tensor& seeds, const Ints& thresholds,
         const Doubles& scales, int64_t path) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        return fastlora::lora_linear_grad_input(grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds,
                                                thresholds, scales, path);
      },
      no_gil);
  // A whole layer call (one adapter) as a C++ autograd node: it records its own graph, so no guard here.
  m.def("lora_layer", &fastlora::lora_layer, no_gil);
  m.def("lora_layer_half", &fastlora::lora_layer_half, no_gil);  // its LoRA products in x's dtype too
}
