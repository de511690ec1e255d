// AVX-512 kernels of the thin LoRA products with a bf16/fp16 operand (half_thin.cpp): fp32 FMAs, the half operand
// widened in registers, the LoRA rank in the register tile. At rank 16 MKL's fp32 GEMM runs these skinny shapes at
// about half the speed of oneDNN's bf16 GEMM (which the split practice uses, rounding A, B and S to bf16); these
// keep fp32 operands and run at about the bf16 GEMM's speed. Elsewhere half_thin.cpp widens blocks for fp32 BLAS.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "nf4_dequant.h"  // FASTLORA_X86, use_avx2

namespace fastlora {

inline bool cpu_has_avx512() {
#ifdef FASTLORA_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

// Tests switch the AVX-512 kernels off to exercise the AVX2 ones on AVX-512 machines.
inline std::atomic<bool>& avx512_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

// The portable switch (set_avx2_enabled(false)) turns these off too.
inline bool use_avx512() { return cpu_has_avx512() && use_avx2() && avx512_enabled().load(std::memory_order_relaxed); }

#ifdef FASTLORA_X86
#define FASTLORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

namespace avx512 {

// An accumulator register: __m512 without its may_alias attribute, so that the compiler keeps an array of them in
// registers (with __m512 it assumes they may alias the float loads and stores them back every iteration).
typedef float Accumulator __attribute__((vector_size(64)));

FASTLORA_AVX512 inline __mmask16 lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// Up to 16 half values widened to fp32 (exact); lanes outside `mask` are zero.
FASTLORA_AVX512 inline __m512 load(const c10::BFloat16* in, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, in);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

FASTLORA_AVX512 inline __m512 load(const c10::Half* in, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, in));
}

// Up to 16 fp32 values rounded to nearest even (bf16: as c10::BFloat16, NaN kept; fp16: F16C, as c10::Half).
FASTLORA_AVX512 inline void store(c10::BFloat16* out, __mmask16 mask, __m512 value) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  _mm512_mask_cvtepi32_storeu_epi16(out, mask, rounded);
}

FASTLORA_AVX512 inline void store(c10::Half* out, __mmask16 mask, __m512 value) {
  const __m256i half = _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_mask_storeu_epi16(out, mask, half);
}

// acc[i][c] += sum over t < depth of a[i * lda + t] * w[t * ldw + 16 c : +16 (mask[c])], for R rows and C chunks of
// 16 columns: the rank-r outer-product steps of both products below, one broadcast per row and step shared by its C
// FMAs, the accumulators in registers.
template <int R, int C>
FASTLORA_AVX512 inline void accumulate(Accumulator (&acc)[R][C], const float* __restrict__ a, int64_t lda,
                                       const float* __restrict__ w, int64_t ldw, int64_t depth,
                                       const __mmask16 (&mask)[C]) {
  for (int64_t t = 0; t < depth; ++t) {
    __m512 row[C];
    #pragma GCC unroll 4
    for (int c = 0; c < C; ++c) row[c] = _mm512_maskz_loadu_ps(mask[c], w + t * ldw + 16 * c);
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512 value = _mm512_set1_ps(a[i * lda + t]);
      #pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(value, row[c], acc[i][c]);
    }
  }
}

// out[i, j0 + j] = x[i, :k] . wt[j0 + j, :k] for R rows of x (half, rows k apart) and J ranks of wt (fp32 [r, k]
// contiguous): x widened in registers, lanes along k, each of the R*J sums reduced once at the end. No fp32 copy of
// x is written: a widened block cost more than the products where x comes cold from memory (the layer before ran).
template <int R, int J, typename T>
FASTLORA_AVX512 inline void dot_tile(const T* __restrict__ x, int64_t k, const float* __restrict__ wt, int64_t r,
                                     int64_t j0, float* __restrict__ out) {
  Accumulator acc[R][J];
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    #pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < k; t += 16) {
    const __mmask16 mask = lanes(k - t);
    __m512 xs[R];
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) xs[i] = load(x + i * k + t, mask);
    #pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      const __m512 w = _mm512_maskz_loadu_ps(mask, wt + (j0 + j) * k + t);
      #pragma GCC unroll 16
      for (int i = 0; i < R; ++i) acc[i][j] = _mm512_fmadd_ps(xs[i], w, acc[i][j]);
    }
  }
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    #pragma GCC unroll 4
    for (int j = 0; j < J; ++j) out[i * r + j0 + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// out[R rows, r] = x[R rows, :k] @ wt^T, the ranks in tiles of 4, 2, 1.
template <int R, typename T>
FASTLORA_AVX512 inline void rows_dot_tile(const T* x, int64_t k, const float* wt, int64_t r, float* out) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) dot_tile<R, 4>(x, k, wt, r, j, out);
  if (j + 2 <= r) dot_tile<R, 2>(x, k, wt, r, j, out), j += 2;
  if (j < r) dot_tile<R, 1>(x, k, wt, r, j, out);
}

// out[rows, r] = x[rows, k] @ wt[r, k]^T (x half, contiguous; wt and out fp32, contiguous), rows in tiles of 4, 2, 1.
template <typename T>
FASTLORA_AVX512 inline void rows_dot(const T* x, int64_t rows, int64_t k, const float* wt, int64_t r, float* out) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) rows_dot_tile<4>(x + i * k, k, wt, r, out + i * r);
  if (i + 2 <= rows) rows_dot_tile<2>(x + i * k, k, wt, r, out + i * r), i += 2;
  if (i < rows) rows_dot_tile<1>(x + i * k, k, wt, r, out + i * r);
}

// out[j0 : j0+J, col0 : col0+16 (mask)] = d[:m, j0 : j0+J]^T @ x[:m, col0 : ...] (d [m, r], x [m, k], out [r, k]).
template <int J, typename T>
FASTLORA_AVX512 inline void transposed_tile(const float* __restrict__ d, int64_t m, int64_t r, int64_t j0,
                                            const T* __restrict__ x, int64_t k, int64_t col0, __mmask16 mask,
                                            float* __restrict__ out) {
  Accumulator acc[J];
  #pragma GCC unroll 16
  for (int j = 0; j < J; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    const __m512 xv = load(x + i * k + col0, mask);
    const float* row = d + i * r + j0;
    #pragma GCC unroll 16
    for (int j = 0; j < J; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(row[j]), xv, acc[j]);
  }
  #pragma GCC unroll 16
  for (int j = 0; j < J; ++j) _mm512_mask_storeu_ps(out + (j0 + j) * k + col0, mask, acc[j]);
}

// out[:, col0 : col0+16] of d^T @ x, the rank in tiles of 16, then 8, 4, 2, 1.
template <typename T>
FASTLORA_AVX512 inline void transposed_columns(const float* d, int64_t m, int64_t r, const T* x, int64_t k,
                                               int64_t col0, float* out) {
  const __mmask16 mask = lanes(k - col0);
  int64_t j = 0;
  for (; j + 16 <= r; j += 16) transposed_tile<16>(d, m, r, j, x, k, col0, mask, out);
  if (j + 8 <= r) transposed_tile<8>(d, m, r, j, x, k, col0, mask, out), j += 8;
  if (j + 4 <= r) transposed_tile<4>(d, m, r, j, x, k, col0, mask, out), j += 4;
  if (j + 2 <= r) transposed_tile<2>(d, m, r, j, x, k, col0, mask, out), j += 2;
  if (j < r) transposed_tile<1>(d, m, r, j, x, k, col0, mask, out);
}

// out[i0 : i0+R, n0 : n0+16C] = round(out + bias + s[i0 : i0+R, :] @ mat[:, n0 : ...]) (s [rows, r], mat [r, n]
// contiguous fp32; bias fp32 or null), columns past n masked off.
template <int R, int C, typename T>
FASTLORA_AVX512 inline void add_product_tile(T* out, int64_t n, const float* s, int64_t r, const float* mat,
                                             const float* bias, int64_t n0) {
  __mmask16 mask[C];
  #pragma GCC unroll 4
  for (int c = 0; c < C; ++c) mask[c] = lanes(std::max<int64_t>(0, n - n0 - 16 * c));
  Accumulator acc[R][C];
  #pragma GCC unroll 4
  for (int c = 0; c < C; ++c) {
    const __m512 start = bias != nullptr ? _mm512_maskz_loadu_ps(mask[c], bias + n0 + 16 * c) : _mm512_setzero_ps();
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) acc[i][c] = _mm512_add_ps(load(out + i * n + n0 + 16 * c, mask[c]), start);
  }
  accumulate<R, C>(acc, s, r, mat + n0, n, r, mask);
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    #pragma GCC unroll 4
    for (int c = 0; c < C; ++c) store(out + i * n + n0 + 16 * c, mask[c], acc[i][c]);
  }
}

// The tiles of R rows across all columns, 32 at a time: 2R accumulators share each broadcast of s.
template <int R, typename T>
FASTLORA_AVX512 inline void add_product_row_tile(T* out, int64_t n, const float* s, int64_t r, const float* mat,
                                                 const float* bias) {
  for (int64_t n0 = 0; n0 < n; n0 += 32) add_product_tile<R, 2>(out, n, s, r, mat, bias, n0);
}

template <typename T>
FASTLORA_AVX512 inline void add_product_rows(T* out, int64_t rows, int64_t n, const float* s, int64_t r,
                                             const float* mat, const float* bias) {
  constexpr int kRows = 8;
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows) add_product_row_tile<kRows>(out + i * n, n, s + i * r, r, mat, bias);
  if (i + 4 <= rows) add_product_row_tile<4>(out + i * n, n, s + i * r, r, mat, bias), i += 4;
  if (i + 2 <= rows) add_product_row_tile<2>(out + i * n, n, s + i * r, r, mat, bias), i += 2;
  if (i < rows) add_product_row_tile<1>(out + i * n, n, s + i * r, r, mat, bias);
}

}  // namespace avx512
#endif

}  // namespace fastlora
