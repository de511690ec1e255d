// The thin LoRA products with one bf16/fp16 operand (x or dy), computed in fp32 without an fp32 copy of that
// operand: it is converted block by block into an L2-sized per-thread buffer, and each block goes to fp32 BLAS at
// once. See half_thin.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastlora {

// Up to this many rows, a product whose fp32 operand the AVX-512 kernels would first copy into another layout
// (B^T for the LoRA term and dS = dy B) runs on the block path instead, fp32 BLAS reading that operand as it is: the
// copy (r * n floats, twice per call) cost more than the product itself at one token (bf16 512->1536, r=16).
constexpr int64_t kFewRows = 16;

// x[m, k] (bf16/fp16, contiguous) @ mat[k, r] (fp32, any strides): [m, r] fp32, x widened in registers (AVX-512)
// or by row blocks for fp32 BLAS.
// Usage: S = half_times(x, A.t()) (lora_down), dS = half_times(dy, B) (lora_up_grad).
at::Tensor half_times(const at::Tensor& x, const at::Tensor& mat);

// d[m, r]^T (fp32, contiguous) @ x[m, k] (bf16/fp16, contiguous): [r, k] fp32, x converted by column blocks.
// Usage: dA = transposed_times_half(dS, x) (lora_down_grad), dB^T = transposed_times_half(S, dy) (lora_up_grad).
at::Tensor transposed_times_half(const at::Tensor& d, const at::Tensor& x);

// out = round(out + bias + s @ mat) for a contiguous bf16/fp16 out[m, n], s[m, r] and mat[r, n] fp32 (any strides)
// and an optional fp32 bias[n]: the fp32 term is made and added one row block at a time, in cache, never whole.
// Usage: add_product_rounded(y, S, B.t(), bias) (lora_linear), add_product_rounded(dx, dS, A, nullopt).
void add_product_rounded(at::Tensor& out, const at::Tensor& s, const at::Tensor& mat,
                         const std::optional<at::Tensor>& bias);

}  // namespace fastlora
