// One LoRA layer call with a single adapter as a C++ autograd node: the ops of lora_ops.cpp, forward and
// backward, with no Python between them. At a few tokens a layer call's time is mostly host work, and a Python
// autograd.Function's backward (GIL, frames, argument tuples) is a large part of it; this node is one candidate
// of the per-call graph choice in fastlora/functions/graph.py, timed against the others.
//
// It saves what fastlora.functions.lora.LoRALinearFunction saves: x, the thin S = s * drop(x) A^T and the dropout
// seed; W, A and B are the layer's own tensors. Dropout masks are regenerated from the seed in backward.
#include <torch/csrc/autograd/custom_function.h>

#include "lora_ops.h"

namespace fastlora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// The adapter tensors come first, so their input indices (0: x, 1: A, 2: B) do not depend on which optional
// base tensors are present.
struct LoraLayerNode : public torch::autograd::Function<LoraLayerNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& weight,
                            const std::optional<at::Tensor>& absmax, int64_t blocksize,
                            const std::optional<at::Tensor>& bias, const at::Tensor& seeds, int64_t threshold,
                            double keep_scale, double lora_scale, int64_t path) {
    const int64_t rank = lora_a.size(0);
    const at::Tensor lora_s = lora_down(x, lora_a, {rank}, seeds, {threshold}, {keep_scale}, {lora_scale});
    at::Tensor y = lora_linear(x, weight, absmax, blocksize, bias, lora_s, lora_b, path, std::nullopt);
    ctx->save_for_backward({x, lora_a, lora_b, weight, absmax.value_or(at::Tensor()), lora_s, seeds});
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["threshold"] = threshold;
    ctx->saved_data["keep_scale"] = keep_scale;
    ctx->saved_data["lora_scale"] = lora_scale;
    ctx->saved_data["path"] = path;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Unpacking first: a saved-tensor hook may run Python that records a graph (activation checkpointing recomputes
    // the forward here), which must see the autograd keys on.
    const variable_list saved = ctx->get_saved_variables();
    // Without create_graph nothing below needs recording: skip the autograd dispatch of every inner op.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    const at::Tensor &x = saved[0], &lora_a = saved[1], &lora_b = saved[2], &weight = saved[3];
    const at::Tensor &lora_s = saved[5], &seeds = saved[6];
    const std::optional<at::Tensor> absmax = present(saved[4]);
    const int64_t rank = lora_a.size(0), blocksize = ctx->saved_data["blocksize"].toInt();
    const int64_t threshold = ctx->saved_data["threshold"].toInt();
    const double keep_scale = ctx->saved_data["keep_scale"].toDouble();
    const double lora_scale = ctx->saved_data["lora_scale"].toDouble();
    const int64_t path = ctx->saved_data["path"].toInt();

    const at::Tensor grad_out = grads[0].contiguous();
    auto [grad_s, grad_b] = lora_up_grad(grad_out, lora_b, lora_s, {rank}, {lora_scale});
    at::Tensor grad_x, grad_a;
    if (ctx->needs_input_grad(0)) {
      grad_x = lora_linear_grad_input(grad_out, weight, absmax, blocksize, grad_s, lora_a, {rank}, seeds,
                                      {threshold}, {keep_scale}, path);
    }
    if (ctx->needs_input_grad(1)) {
      grad_a = as_dtype(lora_down_grad(grad_s, x, {rank}, seeds, {threshold}, {keep_scale}), lora_a.scalar_type());
    }
    if (ctx->needs_input_grad(2)) {
      grad_b = as_dtype(grad_b, lora_b.scalar_type());
    } else {
      grad_b = at::Tensor();
    }
    // One entry per forward argument; the frozen base and the scalars get none.
    return {grad_x, grad_a, grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor lora_layer(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                      const at::Tensor& weight, const std::optional<at::Tensor>& absmax, int64_t blocksize,
                      const std::optional<at::Tensor>& bias, const at::Tensor& seeds, int64_t threshold,
                      double keep_scale, double lora_scale, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2, "x, lora_a, lora_b must be matrices");
  TORCH_CHECK(!bias.has_value() || !bias->requires_grad(), "lora_layer: the base bias must be frozen");
  const bool records = at::GradMode::is_enabled() && (x.requires_grad() || lora_a.requires_grad() || lora_b.requires_grad());
  if (!records) {  // inference: the two ops alone, without building a node
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor lora_s = lora_down(x, lora_a, {lora_a.size(0)}, seeds, {threshold}, {keep_scale}, {lora_scale});
    return lora_linear(x, weight, absmax, blocksize, bias, lora_s, lora_b, path, std::nullopt);
  }
  return LoraLayerNode::apply(x, lora_a, lora_b, weight, absmax, blocksize, bias, seeds, threshold, keep_scale,
                              lora_scale, path);
}

}  // namespace fastlora
