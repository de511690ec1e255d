// The half-precision base products of lora_ops.cpp's kHalf path (see lora_half.h).
//
// Why: on CPUs with AVX512-BF16 or AMX, ATen's bf16 GEMM (oneDNN) runs about twice as fast as fp32 GEMM, and PEFT
// (bitsandbytes dequantizing to bf16, then a bf16 matmul) uses it. Here W is dequantized straight to x's dtype,
// tile by tile in L1 (half_convert.h), into a reused buffer: half the bytes of the fp32 copy, no fp32 W at all.
// Rounding: W to bf16 as bitsandbytes does, the base product once (oneDNN accumulates in fp32), then the fp32
// LoRA term added and the sum rounded once: one rounding fewer than PEFT, which also rounds its LoRA term.
#include "lora_half.h"

namespace fastlora {
namespace {

// W[n, k] whole in `dtype`: the dense W itself when already so, else converted into the per-thread buffer.
at::Tensor whole_weight(const BaseWeight& base, int64_t n, int64_t k, at::ScalarType dtype) {
  if (base.is_dense(dtype)) return base.dense();
  at::Tensor w = scratch(n, k, dtype);
  if (n * k > 0) base.fill(0, 0, w);
  return w;
}

}  // namespace

at::Tensor half_forward(const BaseWeight& base, const at::Tensor& x, int64_t n, int64_t k, int64_t panel_rows) {
  TORCH_CHECK(is_half(x.scalar_type()), "the half path computes in x's dtype: bf16 or fp16, not ", x.scalar_type());
  const at::ScalarType dtype = x.scalar_type();
  if (panel_rows == 0) return at::mm(x, whole_weight(base, n, k, dtype).t());
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  at::Tensor buffer = scratch(panel_rows, k, dtype);
  for (int64_t row0 = 0; row0 < n; row0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, n - row0);
    at::Tensor panel = buffer.narrow(0, 0, rows);
    base.fill(row0, 0, panel);
    y.narrow(1, row0, rows).copy_(at::mm(x, panel.t()));
  }
  return y;
}

at::Tensor half_grad_input(const BaseWeight& base, const at::Tensor& dy, int64_t n, int64_t k, int64_t panel_cols) {
  TORCH_CHECK(is_half(dy.scalar_type()), "the half path computes in dy's dtype: bf16 or fp16, not ", dy.scalar_type());
  const at::ScalarType dtype = dy.scalar_type();
  if (panel_cols == 0) return at::mm(dy, whole_weight(base, n, k, dtype));
  at::Tensor dx = at::empty({dy.size(0), k}, dy.options());
  at::Tensor buffer = scratch(n, panel_cols, dtype).view({-1});
  for (int64_t col0 = 0; col0 < k; col0 += panel_cols) {
    const int64_t cols = std::min(panel_cols, k - col0);
    at::Tensor panel = buffer.narrow(0, 0, n * cols).view({n, cols});
    base.fill(0, col0, panel);
    dx.narrow(1, col0, cols).copy_(at::mm(dy, panel));
  }
  return dx;
}

}  // namespace fastlora
