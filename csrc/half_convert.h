// fp32 values rounded to bf16 or fp16 (round to nearest even, NaN kept: bit-identical to at::Tensor::to), for the
// half-precision base path: W is dequantized tile by tile into an L1-sized fp32 tile and stored in the GEMM's dtype,
// never written out whole in fp32; and bf16/fp16 values widened to fp32 (exact), for the thin LoRA products.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "nf4_dequant.h"  // FASTLORA_X86, use_avx2

namespace fastlora {

// fp32 elements per conversion tile: 4 KiB, so a tile stays in L1 between its dequantization and its store.
constexpr int64_t kConvertTile = 1024;

// c10::BFloat16's rounding, written branch-free so the compiler vectorizes the loops below.
inline uint16_t bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return value != value ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

inline void store_rounded_portable(const float* in, int64_t count, c10::BFloat16* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = c10::BFloat16(bf16_bits(in[i]), c10::BFloat16::from_bits());
}

inline void store_rounded_portable(const float* in, int64_t count, c10::Half* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = c10::Half(in[i]);
}

#ifdef FASTLORA_X86
__attribute__((target("avx2,fma"))) static void store_rounded_avx2(const float* in, int64_t count,
                                                                   c10::BFloat16* out) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < count; ++i) bits[i] = bf16_bits(in[i]);
}

// F16C rounds to nearest even with IEEE subnormals, as c10::Half does.
__attribute__((target("avx2,fma,f16c"))) static void store_rounded_avx2(const float* in, int64_t count,
                                                                        c10::Half* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), half);
  }
  store_rounded_portable(in + i, count - i, out + i);
}
#endif

// out[0:count] = in[0:count] rounded to T (bf16 or fp16).
template <typename T>
inline void store_rounded(const float* in, int64_t count, T* out) {
#ifdef FASTLORA_X86
  if (use_avx2()) {
    store_rounded_avx2(in, count, out);
    return;
  }
#endif
  store_rounded_portable(in, count, out);
}

// out[0:count] = in[0:count] in fp32 (exact), the other way.
inline void widen_portable(const c10::BFloat16* in, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

inline void widen_portable(const c10::Half* in, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

#ifdef FASTLORA_X86
__attribute__((target("avx2,fma"))) static void widen_avx2(const c10::BFloat16* in, int64_t count, float* out) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(in);
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t wide = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(out + i, &wide, sizeof(wide));
  }
}

__attribute__((target("avx2,fma,f16c"))) static void widen_avx2(const c10::Half* in, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(half));
  }
  widen_portable(in + i, count - i, out + i);
}
#endif

template <typename T>
inline void widen(const T* in, int64_t count, float* out) {
#ifdef FASTLORA_X86
  if (use_avx2()) {
    widen_avx2(in, count, out);
    return;
  }
#endif
  widen_portable(in, count, out);
}

// out[0:count] = produce(tile, offset, n) rounded to T, one kConvertTile-sized fp32 tile at a time; for T = float
// `produce` writes straight into out.
template <typename T, typename Produce>
inline void produce_as(T* out, int64_t count, const Produce& produce) {
  if constexpr (std::is_same_v<T, float>) {
    produce(out, 0, count);
  } else {
    alignas(64) float tile[kConvertTile];
    for (int64_t offset = 0; offset < count; offset += kConvertTile) {
      const int64_t n = std::min(kConvertTile, count - offset);
      produce(tile, offset, n);
      store_rounded(tile, n, out + offset);
    }
  }
}

}  // namespace fastlora
