// The thin LoRA products with a bf16/fp16 operand (see half_thin.h).
//
// Why: the LoRA term is computed in fp32 (one rounding fewer than PEFT), but an fp32 copy of x or dy, or an fp32
// [m, n] term added in a pass of its own, costs a full pass over memory each: on the bf16 base path, where the
// split practice does these products in bf16 in place, those passes were most of the gap to it. Here each thread
// converts one block (at most kBlockElements, L2-resident) and hands it to fp32 BLAS before moving on; one parallel
// region per product. BLAS runs single-threaded inside it (nested parallelism is off), as the blocks are split
// between threads already.
#include "half_thin.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <vector>

#include "base_weight.h"  // kElementGrain, kPanelAlign
#include "half_thin_avx512.h"
#include "lora_half.h"  // is_half

namespace fastlora {
namespace {

// fp32 elements of one converted block: 512 KiB, half the L2 of the EPYC measured (the rest for the thin operand).
constexpr int64_t kBlockElements = 1 << 17;

// A per-thread fp32 [rows, cols] buffer (grown, never shrunk), reused by every block that thread converts.
at::Tensor block_buffer(int64_t rows, int64_t cols) {
  thread_local std::vector<float> buffer;
  const int64_t numel = std::max<int64_t>(rows * cols, 1);
  if (static_cast<int64_t>(buffer.size()) < numel) buffer.resize(numel);
  return at::from_blob(buffer.data(), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// Blocks of `per_block` along an extent of `total`: at least one per thread when the whole is worth splitting.
int64_t block_extent(int64_t total, int64_t other) {
  int64_t per_block = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(other, 1));
  if (total * other >= 2 * kElementGrain) {
    const int64_t threads = at::get_num_threads();
    per_block = std::min(per_block, (total + threads - 1) / threads);
  }
  return std::min(per_block, std::max<int64_t>(total, 1));
}

// body(start, count) for each block of `per_block` of [0, total), the blocks split between threads. The calling
// thread's dispatch state (no autograd below the ops, no autocast) goes with every block.
template <typename Body>
void for_blocks(int64_t total, int64_t per_block, const Body& body) {
  const at::ThreadLocalState state;
  const int64_t blocks = (total + per_block - 1) / per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * per_block;
      body(start, std::min(per_block, total - start));
    }
  });
}

// block[rows, cols] (contiguous fp32) = x[row0 : row0+rows, col0 : col0+cols], widened row by row.
template <typename T>
void widen_block_as(const at::Tensor& x, int64_t row0, int64_t col0, at::Tensor& block) {
  const int64_t rows = block.size(0), cols = block.size(1), stride = x.size(1);
  const T* in = x.data_ptr<T>() + row0 * stride + col0;
  float* out = block.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) widen(in + r * stride, cols, out + r * cols);
}

void widen_block(const at::Tensor& x, int64_t row0, int64_t col0, at::Tensor& block) {
  if (x.scalar_type() == at::kBFloat16) {
    widen_block_as<c10::BFloat16>(x, row0, col0, block);
  } else {
    widen_block_as<c10::Half>(x, row0, col0, block);
  }
}

template <typename T>
void add_rounded_rows(T* out, const float* term, int64_t count) {
  produce_as(out, count, [&](float* tile, int64_t offset, int64_t n) {
    const T* current = out + offset;
    const float* add = term + offset;
    for (int64_t i = 0; i < n; ++i) tile[i] = static_cast<float>(current[i]) + add[i];
  });
}

// fn(pointer) with t's data as c10::BFloat16* or c10::Half*.
template <typename Fn>
void with_half_data(const at::Tensor& t, const Fn& fn) {
  if (t.scalar_type() == at::kBFloat16) {
    fn(t.data_ptr<c10::BFloat16>());
  } else {
    fn(t.data_ptr<c10::Half>());
  }
}

void check_half(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_half(t.scalar_type()) && t.is_contiguous() && t.dim() == 2, name,
              " must be a contiguous bf16/fp16 matrix, got ", t.scalar_type(), " ", t.sizes());
}

}  // namespace

at::Tensor half_times(const at::Tensor& x, const at::Tensor& mat) {
  check_half(x, "half_times: x");
  const int64_t m = x.size(0), k = x.size(1), r = mat.size(1);
  TORCH_CHECK(mat.dim() == 2 && mat.size(0) == k && mat.scalar_type() == at::kFloat, "half_times: mat must be fp32 [",
              k, ", r], got ", mat.scalar_type(), " ", mat.sizes());
  if (k == 0 || m == 0 || r == 0) return at::zeros({m, r}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({m, r}, x.options().dtype(at::kFloat));
#ifdef FASTLORA_X86
  if (use_avx512() && (mat.t().is_contiguous() || m > kFewRows)) {  // x widened in registers, row tiles split between threads
    const at::Tensor wt = mat.t().contiguous();  // [r, k]: each rank's vector along k
    constexpr int64_t kTile = 4;
    with_half_data(x, [&](const auto* data) {
      const int64_t grain = std::max<int64_t>(1, kElementGrain / (kTile * k));
      at::parallel_for(0, (m + kTile - 1) / kTile, grain, [&](int64_t begin, int64_t end) {
        const int64_t row0 = begin * kTile, rows = std::min(m, end * kTile) - row0;
        avx512::rows_dot(data + row0 * k, rows, k, wt.data_ptr<float>(), r, out.data_ptr<float>() + row0 * r);
      });
    });
    return out;
  }
#endif
  for_blocks(m, block_extent(m, k), [&](int64_t row0, int64_t rows) {
    at::Tensor block = block_buffer(rows, k);
    widen_block(x, row0, 0, block);
    at::Tensor out_rows = out.narrow(0, row0, rows);
    at::mm_out(out_rows, block, mat);
  });
  return out;
}

at::Tensor transposed_times_half(const at::Tensor& d, const at::Tensor& x) {
  check_half(x, "transposed_times_half: x");
  const int64_t m = x.size(0), k = x.size(1), r = d.size(1);
  TORCH_CHECK(d.dim() == 2 && d.size(0) == m && d.scalar_type() == at::kFloat && d.is_contiguous(),
              "transposed_times_half: d must be contiguous fp32 [", m, ", r], got ", d.scalar_type(), " ", d.sizes());
  if (k == 0 || m == 0 || r == 0) return at::zeros({r, k}, d.options());
  at::Tensor out = at::empty({r, k}, d.options());
#ifdef FASTLORA_X86
  if (use_avx512()) {  // column strips of 16, x widened in registers
    const int64_t strips = (k + 15) / 16;
    with_half_data(x, [&](const auto* data) {
      at::parallel_for(0, strips, std::max<int64_t>(1, kElementGrain / (16 * m)), [&](int64_t begin, int64_t end) {
        for (int64_t strip = begin; strip < end; ++strip) {
          avx512::transposed_columns(d.data_ptr<float>(), m, r, data, k, strip * 16, out.data_ptr<float>());
        }
      });
    });
    return out;
  }
#endif
  // Column blocks of at least one SIMD-friendly width; a tall x is summed over row chunks that keep the block small.
  const int64_t cols_per = std::min(k, std::max(kPanelAlign, kBlockElements / m / kPanelAlign * kPanelAlign));
  const int64_t rows_per = std::max<int64_t>(1, kBlockElements / cols_per);
  for_blocks(k, std::min(cols_per, block_extent(k, m)), [&](int64_t col0, int64_t cols) {
    at::Tensor tile = out.narrow(1, col0, cols);  // rows of stride k: written by BLAS in place
    for (int64_t row0 = 0; row0 < m; row0 += rows_per) {
      const int64_t rows = std::min(rows_per, m - row0);
      at::Tensor block = block_buffer(rows, cols);
      widen_block(x, row0, col0, block);
      const at::Tensor d_t = d.narrow(0, row0, rows).t();
      if (row0 == 0) {
        at::mm_out(tile, d_t, block);
      } else {
        tile.addmm_(d_t, block);
      }
    }
  });
  return out;
}

void add_product_rounded(at::Tensor& out, const at::Tensor& s, const at::Tensor& mat,
                         const std::optional<at::Tensor>& bias) {
  check_half(out, "add_product_rounded: out");
  const int64_t m = out.size(0), n = out.size(1);
  TORCH_CHECK(s.dim() == 2 && mat.dim() == 2 && s.size(0) == m && mat.size(1) == n && s.size(1) == mat.size(0) &&
                  s.scalar_type() == at::kFloat && mat.scalar_type() == at::kFloat,
              "add_product_rounded: fp32 s [", m, ", r] and mat [r, ", n, "], got ", s.sizes(), " and ", mat.sizes());
  if (m == 0 || n == 0) return;
#ifdef FASTLORA_X86
  if (use_avx512() && (mat.is_contiguous() || m > kFewRows)) {  // the term made in registers, added and rounded there
    const at::Tensor s_rows = s.contiguous(), mat_rows = mat.contiguous();
    const at::Tensor bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
    const float* bias_data = bias_values.defined() ? bias_values.data_ptr<float>() : nullptr;
    const int64_t r = s.size(1);
    with_half_data(out, [&](auto* data) {
      at::parallel_for(0, m, std::max<int64_t>(1, kElementGrain / (n * std::max<int64_t>(r, 1))), [&](int64_t begin, int64_t end) {
        avx512::add_product_rows(data + begin * n, end - begin, n, s_rows.data_ptr<float>() + begin * r, r,
                                 mat_rows.data_ptr<float>(), bias_data);
      });
    });
    return;
  }
#endif
  for_blocks(m, block_extent(m, n), [&](int64_t row0, int64_t rows) {
    at::Tensor term = block_buffer(rows, n);
    const at::Tensor s_rows = s.narrow(0, row0, rows);
    if (bias.has_value()) {
      at::addmm_out(term, bias->expand({rows, n}), s_rows, mat);
    } else {
      at::mm_out(term, s_rows, mat);
    }
    const float* add = term.data_ptr<float>();
    if (out.scalar_type() == at::kBFloat16) {
      add_rounded_rows(out.data_ptr<c10::BFloat16>() + row0 * n, add, rows * n);
    } else {
      add_rounded_rows(out.data_ptr<c10::Half>() + row0 * n, add, rows * n);
    }
  });
}

}  // namespace fastlora
