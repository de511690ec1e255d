// Fused NF4 products for a few tokens (decode-sized M), where dequantizing W to memory and calling BLAS costs
// more than the products: each row (or row slice) of W is dequantized into a small buffer that stays in L1 and
// used at once, so W is read once as 4-bit codes and never written out in fp32.
//
//   y[m, n]  += x[m, :] . W[n, :]            (forward, rows of W split between threads)
//   dx[m, c] += sum_n dy[m, n] * W[n, c]     (input gradient, column slices of W split between threads)
//
// Sums are taken in a different order than BLAS would, well within the fp32 tolerance of the GEMM paths.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "nf4_dequant.h"

namespace fastlora {

inline float dot_portable(const float* a, const float* b, int64_t count) {
  float sum = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    sum += a[i] * b[i];
  }
  return sum;
}

inline void axpy_portable(float alpha, const float* x, float* y, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    y[i] += alpha * x[i];
  }
}

#ifdef FASTLORA_X86
__attribute__((target("avx2,fma"))) static float dot_avx2(const float* a, const float* b, int64_t count) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= count; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  const __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  float sum = _mm_cvtss_f32(half);
  for (; i < count; ++i) {
    sum += a[i] * b[i];
  }
  return sum;
}

__attribute__((target("avx2,fma"))) static void axpy_avx2(float alpha, const float* x, float* y, int64_t count) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < count; ++i) {
    y[i] += alpha * x[i];
  }
}
#endif

inline float dot(const float* a, const float* b, int64_t count) {
#ifdef FASTLORA_X86
  if (use_avx2()) {
    return dot_avx2(a, b, count);
  }
#endif
  return dot_portable(a, b, count);
}

inline void axpy(float alpha, const float* x, float* y, int64_t count) {
#ifdef FASTLORA_X86
  if (use_avx2()) {
    axpy_avx2(alpha, x, y, count);
    return;
  }
#endif
  axpy_portable(alpha, x, y, count);
}

// y[m, row0:row1] += x[m, :] . W[row, :] for m < tokens; x [tokens, k] and y [tokens, n] contiguous fp32.
inline void nf4_rows_times_tokens(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t k,
                                  int64_t n, const float* x, int64_t tokens, float* y, int64_t row0,
                                  int64_t row1) {
  thread_local std::vector<float> row;
  row.resize(static_cast<size_t>(k));
  for (int64_t r = row0; r < row1; ++r) {
    dequantize_segment(packed, absmax, blocksize, r * k, k, row.data());
    for (int64_t m = 0; m < tokens; ++m) {
      y[m * n + r] += dot(x + m * k, row.data(), k);
    }
  }
}

// dx[m, col0:col1] += sum_n dy[m, n] * W[n, col0:col1] for m < tokens; dy [tokens, n], dx [tokens, k] contiguous.
inline void nf4_tokens_times_columns(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t k,
                                     int64_t n, const float* dy, int64_t tokens, float* dx, int64_t col0,
                                     int64_t col1) {
  thread_local std::vector<float> slice;
  const int64_t cols = col1 - col0;
  slice.resize(static_cast<size_t>(cols));
  for (int64_t r = 0; r < n; ++r) {
    dequantize_segment(packed, absmax, blocksize, r * k + col0, cols, slice.data());
    for (int64_t m = 0; m < tokens; ++m) {
      axpy(dy[m * n + r], slice.data(), dx + m * k + col0, cols);
    }
  }
}

}  // namespace fastlora
