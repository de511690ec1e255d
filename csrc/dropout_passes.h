// Dropout applied to whole fp32 matrices with the shared counter-based masks (dropout_mask.h): drop(x) for the LoRA
// products' input, and the masked LoRA term added into dx. Used by lora_ops.cpp and lora_layer_half.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "base_weight.h"  // kElementGrain
#include "dropout_mask.h"

namespace fastlora {

// drop(x) for a contiguous fp32 x[M, K]: the shared counter-based mask, kept values scaled.
inline at::Tensor dropped(const at::Tensor& x32, const DropoutMask& mask) {
  at::Tensor out = at::empty_like(x32);
  const int64_t cols = x32.size(1);
  const float* src = x32.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x32.size(0), std::max<int64_t>(1, kElementGrain / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       // flat index modulo 2^32, exactly as the reference computes it
                       const uint32_t row_start = static_cast<uint32_t>(static_cast<uint64_t>(r * cols));
                       masked_row<false>(src + r * cols, dst + r * cols, cols, row_start, mask);
                     }
                   });
  return out;
}

// dst[M, K] += src[M, K] * keep * scale (both contiguous fp32).
inline void add_masked(at::Tensor& dst, const at::Tensor& src, const DropoutMask& mask) {
  const int64_t cols = dst.size(1);
  const float* in = src.data_ptr<float>();
  float* out = dst.data_ptr<float>();
  at::parallel_for(0, dst.size(0), std::max<int64_t>(1, kElementGrain / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const uint32_t row_start = static_cast<uint32_t>(static_cast<uint64_t>(r * cols));
                       masked_row<true>(in + r * cols, out + r * cols, cols, row_start, mask);
                     }
                   });
}

}  // namespace fastlora
