// Grouped (mixture-of-experts) LoRA linear on the CPU: fastlora.grouped_ops' grouped_lora_forward/backward.
//
// x [S, K] is sorted by expert; offsets [E] holds cumulative row counts (rows offsets[e-1]:offsets[e] are expert
// e's). Per expert: S_e = x_e·A_eᵀ (adapter column slices scaled), y_e = x_e·W_eᵀ + S_e·B_eᵀ, and in backward
// dS_e = dy_e·B_e (scaled), dB_e = dy_eᵀ·S_e, dA_e = dS_eᵀ·x_e, dx_e = dy_e·W_e + dS_e·A_e. W, A and B may have
// any strides (gpt-oss's transposed storage): ATen's GEMMs read W through its strides; A and B are made dense once
// per call (PEFT's B is a permuted view whose per-expert slices are strided gathers).
// Experts run in parallel (one thread per expert at a time, each GEMM single-threaded inside the parallel region),
// in fp32 (16-bit inputs are upcast per expert, so each output is rounded once). No [E, N, K] delta is built.
// ATen and the pybind11 Tensor casters only, not <torch/extension.h> (the whole C++ frontend): half the build time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace {

using at::Tensor;

std::vector<int64_t> row_ends(const Tensor& offsets) {
  Tensor ends = offsets.to(at::kLong).cpu().contiguous();
  const int64_t* data = ends.data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + ends.numel());
}

Tensor rank_scales(const std::vector<int64_t>& ranks, const std::vector<double>& scales) {
  std::vector<float> values;
  for (size_t a = 0; a < ranks.size(); ++a) values.insert(values.end(), ranks[a], static_cast<float>(scales[a]));
  return at::tensor(values, at::kFloat).reshape({static_cast<int64_t>(values.size())});
}

Tensor as_float(const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// Calls body(expert, start, end) for every expert with rows, experts spread over the intra-op threads. Grad mode
// is thread-local: off in each worker too (the inputs may require grad; these are the backward's own GEMMs).
template <typename Body>
void for_each_expert(const std::vector<int64_t>& ends, Body body) {
  const int64_t experts = static_cast<int64_t>(ends.size());
  at::parallel_for(0, experts, 1, [&](int64_t first, int64_t last) {
    c10::NoGradGuard no_grad;
    for (int64_t e = first; e < last; ++e) {
      const int64_t start = e == 0 ? 0 : ends[e - 1];
      if (ends[e] > start) body(e, start, ends[e]);
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> grouped_lora_forward(const Tensor& x, const Tensor& offsets, const Tensor& weight,
                                                const Tensor& lora_a, const Tensor& lora_b, std::vector<int64_t> ranks,
                                                std::vector<double> scales) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && lora_a.dim() == 3 && lora_b.dim() == 3, "grouped_lora_forward: shapes");
  const auto ends = row_ends(offsets);
  const int64_t rows = x.size(0), n = weight.size(1), r = lora_a.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty({rows, n}, f32);
  Tensor lora_s = at::empty({rows, r}, f32);
  const int64_t covered = ends.empty() ? 0 : ends.back();
  if (covered < rows) {
    y.narrow(0, covered, rows - covered).zero_();
    lora_s.narrow(0, covered, rows - covered).zero_();
  }
  // A and B once in fp32 and dense (PEFT's B is a permuted view: per-expert slices of it would be gathered twice).
  const Tensor a = lora_a.to(at::kFloat).contiguous(), b = lora_b.to(at::kFloat).contiguous();
  const Tensor column_scale = rank_scales(ranks, scales);
  for_each_expert(ends, [&](int64_t e, int64_t start, int64_t end) {
    const Tensor x_e = as_float(x.narrow(0, start, end - start));
    Tensor y_e = y.narrow(0, start, end - start);
    if (r == 0) {
      at::mm_out(y_e, x_e, as_float(weight[e]).t());
      return;
    }
    Tensor s_e = lora_s.narrow(0, start, end - start);
    at::mm_out(s_e, x_e, a[e].t());
    s_e.mul_(column_scale);
    // The thin LoRA product first, then the base GEMM accumulates onto it (beta = 1): one pass over y_e.
    at::mm_out(y_e, s_e, b[e].t());
    y_e.addmm_(x_e, as_float(weight[e]).t());
  });
  return {x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type()), lora_s};
}

std::tuple<Tensor, Tensor, Tensor> grouped_lora_backward(const Tensor& grad_out, const Tensor& x, const Tensor& lora_s,
                                                         const Tensor& offsets, const Tensor& weight,
                                                         const Tensor& lora_a, const Tensor& lora_b,
                                                         std::vector<int64_t> ranks, std::vector<double> scales,
                                                         bool needs_input_grad) {
  const auto ends = row_ends(offsets);
  const int64_t rows = x.size(0), k = x.size(1), r = lora_a.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_x = at::empty({needs_input_grad ? rows : 0, k}, f32);
  const int64_t covered = ends.empty() ? 0 : ends.back();
  if (needs_input_grad && covered < rows) grad_x.narrow(0, covered, rows - covered).zero_();
  Tensor grad_a = at::zeros(lora_a.sizes(), f32);
  Tensor grad_b = at::zeros(lora_b.sizes(), f32);
  const Tensor a = lora_a.to(at::kFloat).contiguous(), b = lora_b.to(at::kFloat).contiguous();
  const Tensor column_scale = rank_scales(ranks, scales);
  for_each_expert(ends, [&](int64_t e, int64_t start, int64_t end) {
    const int64_t count = end - start;
    const Tensor dy_e = as_float(grad_out.narrow(0, start, count));
    Tensor dx_e = needs_input_grad ? grad_x.narrow(0, start, count) : Tensor();
    if (r == 0) {
      if (needs_input_grad) at::mm_out(dx_e, dy_e, as_float(weight[e]));
      return;
    }
    const Tensor x_e = as_float(x.narrow(0, start, count));
    const Tensor ds_e = at::mm(dy_e, b[e]).mul_(column_scale);
    Tensor grad_b_e = grad_b[e], grad_a_e = grad_a[e];
    at::mm_out(grad_b_e, dy_e.t(), lora_s.narrow(0, start, count));
    at::mm_out(grad_a_e, ds_e.t(), x_e);
    if (needs_input_grad) {
      at::mm_out(dx_e, ds_e, a[e]);
      dx_e.addmm_(dy_e, as_float(weight[e]));
    }
  });
  return {grad_out.scalar_type() == at::kFloat ? grad_x : grad_x.to(grad_out.scalar_type()), grad_a, grad_b};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlora grouped (mixture-of-experts) LoRA ops on the CPU";
  m.def("grouped_lora_forward", &grouped_lora_forward, py::call_guard<py::gil_scoped_release>());
  m.def("grouped_lora_backward", &grouped_lora_backward, py::call_guard<py::gil_scoped_release>());
}
