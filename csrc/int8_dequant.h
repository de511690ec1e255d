// bitsandbytes 8-bit (LLM.int8) weights into fp32: int8 codes W[N, K], row-major, one fp32 scale per row (SCB).
//
// value = code * SCB[row] * kInt8Scale in fp32, left to right, where kInt8Scale is bitsandbytes' fp32 reciprocal
// of 127: bit-identical to bitsandbytes.functional.int8_vectorwise_dequant (built with -ffp-contract=off).
#pragma once

#include <cstdint>

#include "nf4_dequant.h"  // cpu_has_avx2 / use_avx2, FASTLORA_X86

namespace fastlora {

constexpr float kInt8Scale = 7.874015718698502e-3f;

inline void int8_dequantize_row_portable(const int8_t* codes, float scb, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<float>(codes[i]) * scb * kInt8Scale;
  }
}

#ifdef FASTLORA_X86
// The same loop, compiled for AVX2 (the compiler vectorizes it: 8 codes widened and converted per step).
__attribute__((target("avx2,fma"))) static void int8_dequantize_row_avx2(const int8_t* codes, float scb,
                                                                         int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<float>(codes[i]) * scb * kInt8Scale;
  }
}
#endif

// out[0:count] = W[row, col0:col0+count] in fp32, given that row's codes starting at col0 and its scale.
inline void int8_dequantize_row(const int8_t* codes, float scb, int64_t count, float* out) {
#ifdef FASTLORA_X86
  if (use_avx2()) {
    int8_dequantize_row_avx2(codes, scb, count, out);
    return;
  }
#endif
  int8_dequantize_row_portable(codes, scb, count, out);
}

}  // namespace fastlora
