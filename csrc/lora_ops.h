// The C++ CPU operators of lora_ops.cpp, for the other translation units (lora_layer.cpp builds on them).
// Signatures mirror fastlora/backends/reference.py; see lora_ops.cpp for how each computes.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastlora {

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& lora_a, at::IntArrayRef ranks, const at::Tensor& seeds,
                     at::IntArrayRef thresholds, at::ArrayRef<double> keep_scales, at::ArrayRef<double> lora_scales);

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& absmax,
                       int64_t blocksize, const std::optional<at::Tensor>& bias, const at::Tensor& lora_s,
                       const at::Tensor& lora_b, int64_t path, const std::optional<at::Tensor>& col_scale);

std::tuple<at::Tensor, at::Tensor> lora_up_grad(const at::Tensor& grad_out, const at::Tensor& lora_b,
                                                const at::Tensor& lora_s, at::IntArrayRef ranks,
                                                at::ArrayRef<double> lora_scales);

at::Tensor lora_down_grad(const at::Tensor& grad_s, const at::Tensor& x, at::IntArrayRef ranks,
                          const at::Tensor& seeds, at::IntArrayRef thresholds, at::ArrayRef<double> keep_scales);

at::Tensor lora_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& absmax, int64_t blocksize,
                                  const at::Tensor& grad_s, const at::Tensor& lora_a, at::IntArrayRef ranks,
                                  const at::Tensor& seeds, at::IntArrayRef thresholds,
                                  at::ArrayRef<double> keep_scales, int64_t path);

// The half path's panel extent along `total` when the other axis of W has `other` elements (0: W whole).
int64_t half_panel_extent(int64_t other, int64_t total);

// One LoRA layer call with a single adapter as a C++ autograd node (lora_layer.cpp); `path`: both base products'.
at::Tensor lora_layer(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                      const at::Tensor& weight, const std::optional<at::Tensor>& absmax, int64_t blocksize,
                      const std::optional<at::Tensor>& bias, const at::Tensor& seeds, int64_t threshold,
                      double keep_scale, double lora_scale, int64_t path);

// The same call with its LoRA products in x's dtype (bf16/fp16) too, adapters in that dtype (lora_layer_half.cpp).
at::Tensor lora_layer_half(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           const at::Tensor& weight, const std::optional<at::Tensor>& absmax, int64_t blocksize,
                           const std::optional<at::Tensor>& bias, const at::Tensor& seeds, int64_t threshold,
                           double keep_scale, double lora_scale);

}  // namespace fastlora
