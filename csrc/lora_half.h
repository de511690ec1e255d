// The "half" base path of lora_ops.cpp: W converted to x's dtype (bf16 or fp16) and multiplied by ATen's GEMM in
// that dtype (oneDNN's AVX512-BF16/AMX kernels where the CPU has them), the thin LoRA term added in fp32 and the
// sum rounded once more. See lora_half.cpp.
#pragma once

#include <ATen/ATen.h>

#include "base_weight.h"

namespace fastlora {

// Whether `dtype` is one the half path computes in (bf16, fp16).
inline bool is_half(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// x[m, k] @ W^T in x's dtype ([m, n], rounded once). W is converted whole into a reused per-thread buffer
// (panel_rows == 0) or by row panels of `panel_rows`; a dense W already in x's dtype is read as it is.
at::Tensor half_forward(const BaseWeight& base, const at::Tensor& x, int64_t n, int64_t k, int64_t panel_rows);

// dy[m, n] @ W in dy's dtype ([m, k]), W whole (panel_cols == 0) or by column panels of `panel_cols`.
at::Tensor half_grad_input(const BaseWeight& base, const at::Tensor& dy, int64_t n, int64_t k, int64_t panel_cols);

}  // namespace fastlora
