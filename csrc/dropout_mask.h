// Counter-based dropout masks, bit for bit the definition in fastlora/formats/dropout.py:
// element (m, k) of x[M, K] is kept when mix32(((m*K + k) mod 2^32) XOR mix32(seed)) >= threshold,
// where threshold = floor(p * 2^32) comes from the host; kept values are scaled by 1/(1-p).
//
// The row kernels multiply by a 0/1 factor and then by the scale, in that order, because that is what the
// reference does (x * keep * scale): the sign of dropped zeros and NaN propagation come out identical.
#pragma once

#include <cstdint>

#include "nf4_dequant.h"  // use_avx2

namespace fastlora {

// lowbias32 (C. Wellons): a bijection on uint32 with good avalanche; uint32 products wrap as in the reference.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

struct DropoutMask {
  uint32_t key;        // mix32(seed)
  uint32_t threshold;  // drop when hash < threshold
  float keep_scale;    // 1/(1-p), rounded to fp32 as torch rounds a Python scalar for an fp32 tensor

  DropoutMask(int64_t seed, int64_t threshold_, double keep_scale_)
      : key(mix32(static_cast<uint32_t>(seed & 0xFFFFFFFFLL))),
        threshold(static_cast<uint32_t>(threshold_)),
        keep_scale(static_cast<float>(keep_scale_)) {}
};

// One row: dst[c] = src[c] * keep(c) * scale (accumulate=false) or dst[c] += src[c] * keep(c) * scale.
// `row_start` is (row * K) mod 2^32, the flat index of the row's first element.
template <bool kAccumulate>
static inline __attribute__((always_inline)) void masked_row_body(const float* src, float* dst, int64_t cols,
                                                                   uint32_t row_start, const DropoutMask& mask) {
  for (int64_t c = 0; c < cols; ++c) {
    const uint32_t hash = mix32((row_start + static_cast<uint32_t>(c)) ^ mask.key);
    const float keep = hash >= mask.threshold ? 1.0f : 0.0f;
    const float value = src[c] * keep * mask.keep_scale;
    if (kAccumulate) {
      dst[c] += value;
    } else {
      dst[c] = value;
    }
  }
}

#ifdef FASTLORA_X86
template <bool kAccumulate>
__attribute__((target("avx2,fma"))) static void masked_row_avx2(const float* src, float* dst, int64_t cols,
                                                                uint32_t row_start, const DropoutMask& mask) {
  masked_row_body<kAccumulate>(src, dst, cols, row_start, mask);
}
#endif

template <bool kAccumulate>
static void masked_row_portable(const float* src, float* dst, int64_t cols, uint32_t row_start,
                                const DropoutMask& mask) {
  masked_row_body<kAccumulate>(src, dst, cols, row_start, mask);
}

template <bool kAccumulate>
inline void masked_row(const float* src, float* dst, int64_t cols, uint32_t row_start, const DropoutMask& mask) {
#ifdef FASTLORA_X86
  if (use_avx2()) {
    masked_row_avx2<kAccumulate>(src, dst, cols, row_start, mask);
    return;
  }
#endif
  masked_row_portable<kAccumulate>(src, dst, cols, row_start, mask);
}

}  // namespace fastlora
