// The frozen base weight of a LoRA layer as the C++ ops read it (lora_ops.cpp, lora_half.cpp): dense, bitsandbytes
// 8-bit or NF4, handed to BLAS as it is, converted into fp32/bf16/fp16 panels, or multiplied by the fused
// few-token kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "half_convert.h"
#include "int8_dequant.h"
#include "nf4_dequant.h"
#include "nf4_gemv.h"
#include "nf4_half_avx512.h"

namespace fastlora {

// Elements per parallel task for elementwise loops: enough work to amortize waking a thread.
constexpr int64_t kElementGrain = 1 << 15;
constexpr int64_t kPanelAlign = 16;

// The ops compute in the dtypes they choose (fp32, or x's on the half paths); under torch.autocast the ATen calls
// inside them would otherwise be re-dispatched through autocast and run in bf16. Every op opens one of these first.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Already fp32 and contiguous (the common case) returns t itself, without two dispatcher round trips: at a few
// tokens an op's host work is most of its time.
inline at::Tensor as_f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// A reused per-thread scratch of `dtype` (fp32, bf16 or fp16) with at least rows * cols elements, viewed as
// [rows, cols]. It only ever holds a converted copy of W that one op reads and drops before returning, so it never
// aliases an op's output.
inline at::Tensor scratch(int64_t rows, int64_t cols, at::ScalarType dtype = at::kFloat) {
  thread_local at::Tensor buffers[3];  // fp32, bf16, fp16
  at::Tensor& buffer = buffers[dtype == at::kFloat ? 0 : dtype == at::kBFloat16 ? 1 : 2];
  const int64_t numel = rows * cols;
  if (!buffer.defined() || buffer.numel() < numel) {
    buffer = at::Tensor();  // free the old one first: the peak is one buffer, not two
    // A normal tensor even when first made under torch.inference_mode(): it outlives the call, and later calls
    // outside inference mode write into it in place, which an inference tensor refuses.
    const c10::InferenceMode normal_tensor(false);
    buffer = at::empty({numel}, at::TensorOptions().dtype(dtype));
  }
  return buffer.narrow(0, 0, numel).view({rows, cols});
}

// The frozen base weight W[n, k]: dense in any floating dtype (read through its strides: a transposed view is
// never copied whole), bitsandbytes 8-bit (int8 codes [n, k] with absmax = per-row SCB), or NF4-packed.
class BaseWeight {
 public:
  BaseWeight(const at::Tensor& weight, const std::optional<at::Tensor>& absmax, int64_t blocksize, int64_t n,
             int64_t k)
      : blocksize_(blocksize), n_(n), k_(k) {
    if (absmax.has_value() && weight.scalar_type() == at::kChar) {
      codes_ = weight.contiguous();
      row_scales_ = as_f32(*absmax);
      TORCH_CHECK(weight.dim() == 2 && weight.size(0) == n && weight.size(1) == k, "int8 weight must be [", n,
                  ", ", k, "], got ", weight.sizes());
      TORCH_CHECK(row_scales_.numel() == n, "int8 weight needs one scale per row: ", n, ", got ",
                  row_scales_.numel());
    } else if (absmax.has_value()) {
      packed_ = weight.view(at::kByte).reshape({-1}).contiguous();
      absmax_ = as_f32(*absmax);
      TORCH_CHECK(packed_.numel() == (n * k + 1) / 2, "packed NF4 weight has ", packed_.numel(),
                  " bytes, expected ", (n * k + 1) / 2, " for shape [", n, ", ", k, "]");
      TORCH_CHECK(blocksize > 0 && absmax_.numel() >= (n * k + blocksize - 1) / blocksize,
                  "absmax has too few blocks for blocksize ", blocksize);
    } else {
      dense_ = weight;
      TORCH_CHECK(weight.dim() == 2 && weight.size(0) == n && weight.size(1) == k, "dense weight must be [", n,
                  ", ", k, "], got ", weight.sizes());
    }
  }

  // fp32 dense weights go straight to BLAS; everything else is converted (whole or by panels) or fused.
  bool is_dense_f32() const { return dense_.defined() && dense_.scalar_type() == at::kFloat; }
  // Whether the fused few-token kernels take a product with `tokens` rows.
  bool fused_for(int64_t tokens, int64_t fused_tokens) const {
    return packed_.defined() && tokens <= fused_tokens && n_ > 0 && k_ > 0;
  }
  // Whether the fused few-token kernels exist for this weight at all (NF4), whatever the token count.
  bool has_fused_kernels() const { return packed_.defined() && n_ > 0 && k_ > 0; }

  // y[tokens, n] += x[tokens, k] @ W^T without materializing W (all contiguous fp32).
  void fused_forward(const at::Tensor& x32, at::Tensor& y32) const {
    const uint8_t* packed = packed_.data_ptr<uint8_t>();
    const float* absmax = absmax_.data_ptr<float>();
    const float* x = x32.data_ptr<float>();
    float* y = y32.data_ptr<float>();
    const int64_t tokens = x32.size(0);
    at::parallel_for(0, n_, std::max<int64_t>(1, kElementGrain / k_), [&](int64_t begin, int64_t end) {
      nf4_rows_times_tokens(packed, absmax, blocksize_, k_, n_, x, tokens, y, begin, end);
    });
  }

  // dx[tokens, k] += dy[tokens, n] @ W without materializing W (all contiguous fp32); threads own column slices.
  void fused_grad_input(const at::Tensor& dy32, at::Tensor& dx32) const {
    const uint8_t* packed = packed_.data_ptr<uint8_t>();
    const float* absmax = absmax_.data_ptr<float>();
    const float* dy = dy32.data_ptr<float>();
    float* dx = dx32.data_ptr<float>();
    const int64_t tokens = dy32.size(0);
    constexpr int64_t kSlice = 64;  // columns per task: whole 32-element dequant steps, slices stay in L1
    const int64_t slices = (k_ + kSlice - 1) / kSlice;
    at::parallel_for(0, slices, std::max<int64_t>(1, kElementGrain / (kSlice * n_)), [&](int64_t begin, int64_t end) {
      nf4_tokens_times_columns(packed, absmax, blocksize_, k_, n_, dy, tokens, dx, begin * kSlice,
                               std::min(k_, end * kSlice));
    });
  }
  const at::Tensor& dense() const { return dense_; }

  // Whether W is dense and already in `dtype` (a GEMM in that dtype reads it as it is).
  bool is_dense(at::ScalarType dtype) const { return dense_.defined() && dense_.scalar_type() == dtype; }

  // panel[rows, cols] (contiguous; fp32, bf16 or fp16) = W[row0 : row0+rows, col0 : col0+cols] in the panel's
  // dtype: values computed in fp32 as bitsandbytes does, then rounded once (nearest even).
  void fill(int64_t row0, int64_t col0, at::Tensor& panel) const {
    if (dense_.defined()) {
      panel.copy_(dense_.narrow(0, row0, panel.size(0)).narrow(1, col0, panel.size(1)));
      return;
    }
    switch (panel.scalar_type()) {
      case at::kFloat:
        return fill_as<float>(row0, col0, panel);
      case at::kBFloat16:
        return fill_as<c10::BFloat16>(row0, col0, panel);
      case at::kHalf:
        return fill_as<c10::Half>(row0, col0, panel);
      default:
        TORCH_CHECK(false, "a weight panel is fp32, bf16 or fp16, not ", panel.scalar_type());
    }
  }

 private:
  template <typename T>
  void fill_as(int64_t row0, int64_t col0, at::Tensor& panel) const {
    const int64_t rows = panel.size(0), cols = panel.size(1);
    T* out = panel.data_ptr<T>();
    if (codes_.defined()) {
      const int8_t* codes = codes_.data_ptr<int8_t>();
      const float* scales = row_scales_.data_ptr<float>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(cols, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t r = begin; r < end; ++r) {
                           const int8_t* row = codes + (row0 + r) * k_ + col0;
                           produce_as(out + r * cols, cols, [&](float* tile, int64_t offset, int64_t count) {
                             int8_dequantize_row(row + offset, scales[row0 + r], count, tile);
                           });
                         }
                       });
      return;
    }
    const auto nf4_segment = [&](int64_t flat, int64_t count, T* dst) {
#ifdef FASTLORA_X86
      if constexpr (!std::is_same_v<T, float>) {
        if (nf4_rounded_avx512(blocksize_)) {
          dequantize_rounded_avx512(packed_.data_ptr<uint8_t>(), absmax_.data_ptr<float>(), blocksize_, flat, count, dst);
          return;
        }
      }
#endif
      produce_as(dst, count, [&](float* tile, int64_t offset, int64_t n) {
        dequantize_segment(packed_.data_ptr<uint8_t>(), absmax_.data_ptr<float>(), blocksize_, flat + offset, n, tile);
      });
    };
    if (cols == k_) {  // whole rows: one contiguous flat range, split evenly between threads
      const int64_t start = row0 * k_, count = rows * k_;
      at::parallel_for(0, (count + kPanelAlign - 1) / kPanelAlign, kElementGrain / kPanelAlign,
                       [&](int64_t begin, int64_t end) {
                         const int64_t first = begin * kPanelAlign;
                         const int64_t last = std::min(count, end * kPanelAlign);
                         nf4_segment(start + first, last - first, out + first);
                       });
      return;
    }
    at::parallel_for(0, rows, std::max<int64_t>(1, kElementGrain / cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        nf4_segment((row0 + r) * k_ + col0, cols, out + r * cols);
      }
    });
  }

  at::Tensor dense_, packed_, absmax_, codes_, row_scales_;
  int64_t blocksize_, n_, k_;
};

}  // namespace fastlora
