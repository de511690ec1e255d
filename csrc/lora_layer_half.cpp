// One LoRA layer call (one adapter) with every product in x's dtype (bf16/fp16): the base GEMMs as on the half path
// (lora_half.cpp: W converted to that dtype into a reused buffer, oneDNN's GEMM) and the LoRA products as GEMMs in
// that dtype too, as the split practice computes them. A candidate of fastlora/functions/graph.py
// ("native_half_lora") only where the adapter weights are in x's dtype themselves (PEFT's
// autocast_adapter_dtype=False, or a model cast whole): PEFT then runs its LoRA chain in that dtype, rounding after
// every product, its scaling and its sum; here each product accumulates in fp32 and rounds once, and the LoRA terms
// join y and dx inside the GEMM (addmm_), so no result is farther from the exact one than PEFT's. With fp32 adapters
// PEFT computes the chain in fp32, as the "native_half" graph does (lora_layer.cpp), and this one is not offered.
//
// It saves x, the rounded S = drop(x) A^T (unscaled, as PEFT's lora_A output) and the dropout seed; W, A and B are
// the layer's own. Dropout: drop(x) rounded to x's dtype once (PEFT's nn.Dropout rounds it too), regenerated from
// the seed in backward.
#include <torch/csrc/autograd/custom_function.h>

#include "dropout_passes.h"
#include "lora_half.h"
#include "lora_ops.h"

namespace fastlora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

DropoutMask mask_of(const at::Tensor& seeds, int64_t threshold, double keep_scale) {
  return DropoutMask(seeds.to(at::kLong).contiguous().data_ptr<int64_t>()[0], threshold, keep_scale);
}

// drop(x) in x's dtype: x itself without dropout, else x * keep * 1/(1-p) computed in fp32 and rounded once.
at::Tensor dropped_input(const at::Tensor& x, const at::Tensor& seeds, int64_t threshold, double keep_scale) {
  if (threshold == 0 && keep_scale == 1.0) return x;
  return dropped(x.to(at::kFloat).contiguous(), mask_of(seeds, threshold, keep_scale)).to(x.scalar_type());
}

// (y, S) of one call on a contiguous x: S = drop(x) A^T rounded to x's dtype; y = round(round(x W^T) + bias), then
// s * S B^T accumulated onto it in fp32 and the sum rounded once.
std::pair<at::Tensor, at::Tensor> forward_products(const at::Tensor& x, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& absmax, int64_t blocksize,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& seeds,
                                                   int64_t threshold, double keep_scale, double lora_scale) {
  const int64_t n = lora_b.size(0), k = x.size(1);
  const at::Tensor lora_s = at::mm(dropped_input(x, seeds, threshold, keep_scale), lora_a.t());
  at::Tensor y = half_forward(BaseWeight(weight, absmax, blocksize, n, k), x, n, k, half_panel_extent(k, n));
  if (bias.has_value()) y.add_(*bias);
  y.addmm_(lora_s, lora_b.t(), 1.0, lora_scale);
  return {y, lora_s};
}

void check_inputs(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b) {
  TORCH_CHECK(x.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2, "x, lora_a, lora_b must be matrices");
  TORCH_CHECK(is_half(x.scalar_type()) && lora_a.scalar_type() == x.scalar_type() &&
                  lora_b.scalar_type() == x.scalar_type(),
              "lora_layer_half computes in x's dtype: x and the adapter weights must all be bf16 or all fp16, got ",
              x.scalar_type(), ", ", lora_a.scalar_type(), ", ", lora_b.scalar_type());
}

struct HalfLoraLayerNode : public torch::autograd::Function<HalfLoraLayerNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& weight,
                            const std::optional<at::Tensor>& absmax, int64_t blocksize,
                            const std::optional<at::Tensor>& bias, const at::Tensor& seeds, int64_t threshold,
                            double keep_scale, double lora_scale) {
    const NoAutocast in_dtype;
    const at::Tensor x_rows = x.contiguous();
    auto [y, lora_s] = forward_products(x_rows, lora_a, lora_b, weight, absmax, blocksize, bias, seeds, threshold,
                                        keep_scale, lora_scale);
    ctx->save_for_backward({x_rows, lora_a, lora_b, weight, absmax.value_or(at::Tensor()), lora_s, seeds});
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["threshold"] = threshold;
    ctx->saved_data["keep_scale"] = keep_scale;
    ctx->saved_data["lora_scale"] = lora_scale;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const NoAutocast in_dtype;
    const variable_list saved = ctx->get_saved_variables();  // first: a saved-tensor hook may record a graph
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    const at::Tensor &x = saved[0], &lora_a = saved[1], &lora_b = saved[2], &weight = saved[3];
    const at::Tensor &lora_s = saved[5], &seeds = saved[6];
    const std::optional<at::Tensor> absmax = saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    const int64_t blocksize = ctx->saved_data["blocksize"].toInt(), threshold = ctx->saved_data["threshold"].toInt();
    const double keep_scale = ctx->saved_data["keep_scale"].toDouble();
    const double lora_scale = ctx->saved_data["lora_scale"].toDouble();
    const bool dropout = threshold != 0 || keep_scale != 1.0;

    const at::Tensor grad_out = grads[0].to(x.scalar_type()).contiguous();
    at::Tensor grad_s = at::mm(grad_out, lora_b);  // [m, r]: d(S B^T) / dS, then the scale (PEFT scales dy first)
    if (lora_scale != 1.0) grad_s.mul_(lora_scale);
    at::Tensor grad_x, grad_a, grad_b;
    if (ctx->needs_input_grad(0)) {
      const int64_t n = grad_out.size(1), k = x.size(1);
      const BaseWeight base(weight, absmax, blocksize, n, k);
      grad_x = half_grad_input(base, grad_out, n, k, half_panel_extent(n, k));
      if (!dropout) {
        grad_x.addmm_(grad_s, lora_a);
      } else {  // the LoRA term rounded once, masked and added in fp32, the sum rounded once
        at::Tensor sum = grad_x.to(at::kFloat);
        add_masked(sum, at::mm(grad_s, lora_a).to(at::kFloat), mask_of(seeds, threshold, keep_scale));
        grad_x = sum.to(x.scalar_type());
      }
    }
    if (ctx->needs_input_grad(1)) grad_a = at::mm(grad_s.t(), dropped_input(x, seeds, threshold, keep_scale));
    if (ctx->needs_input_grad(2)) {
      grad_b = at::mm(grad_out.t(), lora_s);
      if (lora_scale != 1.0) grad_b.mul_(lora_scale);
    }
    return {grad_x, grad_a, grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor lora_layer_half(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           const at::Tensor& weight, const std::optional<at::Tensor>& absmax, int64_t blocksize,
                           const std::optional<at::Tensor>& bias, const at::Tensor& seeds, int64_t threshold,
                           double keep_scale, double lora_scale) {
  check_inputs(x, lora_a, lora_b);
  TORCH_CHECK(!bias.has_value() || !bias->requires_grad(), "lora_layer_half: the base bias must be frozen");
  const bool records = at::GradMode::is_enabled() && (x.requires_grad() || lora_a.requires_grad() || lora_b.requires_grad());
  if (!records) {  // inference: the products alone, without building a node
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const NoAutocast in_dtype;
    return forward_products(x.contiguous(), lora_a, lora_b, weight, absmax, blocksize, bias, seeds, threshold,
                            keep_scale, lora_scale).first;
  }
  return HalfLoraLayerNode::apply(x, lora_a, lora_b, weight, absmax, blocksize, bias, seeds, threshold, keep_scale,
                                  lora_scale);
}

}  // namespace fastlora
