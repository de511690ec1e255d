// NF4 dequantization of flat segments of a bitsandbytes-packed weight into fp32.
//
// Layout (bitsandbytes): W[N, K] flattened row-major, two 4-bit codes per byte, element 2i in the high
// nibble and 2i+1 in the low one; blocks of `blocksize` consecutive flat elements share one fp32 absmax.
// value = kNF4Table[code] * absmax[flat / blocksize], one fp32 multiply (bit-identical to bitsandbytes).
//
// The AVX2 path is compiled with a function-level target attribute and chosen at run time, so one build
// runs on any x86-64 CPU; other CPUs take the portable path.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTLORA_X86 1
#endif

namespace fastlora {

alignas(32) static const float kNF4Table[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

// Portable path: walk block by block so the absmax division happens once per block, not per element.
inline void dequantize_segment_portable(const uint8_t* packed, const float* absmax, int64_t blocksize,
                                        int64_t flat, int64_t count, float* out) {
  const int64_t end = flat + count;
  while (flat < end) {
    const int64_t block = flat / blocksize;
    const int64_t block_end = std::min(end, (block + 1) * blocksize);
    const float scale = absmax[block];
    for (; flat < block_end; ++flat, ++out) {
      const uint8_t byte = packed[flat >> 1];
      const uint8_t code = (flat & 1) ? (byte & 0x0F) : (byte >> 4);
      *out = kNF4Table[code] * scale;
    }
  }
}

#ifdef FASTLORA_X86
// 8 lanes of 4-bit codes (int32) -> table values: two in-register 8-entry lookups and a blend on bit 3.
__attribute__((target("avx2,fma"))) static inline __m256 nf4_lookup_avx2(__m256i codes, __m256 table_low,
                                                                          __m256 table_high) {
  const __m256 low = _mm256_permutevar8x32_ps(table_low, codes);
  const __m256 high = _mm256_permutevar8x32_ps(table_high, codes);
  const __m256 use_high = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(low, high, use_high);
}

// 32 elements per step from 16 bytes, for blocksizes that are multiples of 32 (all bitsandbytes ones): the
// 16-entry table is split into its four byte planes, each looked up with one in-lane byte shuffle (vpshufb),
// and the planes are interleaved back into floats. The codes are first ordered so that the interleave yields
// whole output vectors without lane-crossing fix-ups: lane 0 holds elements 0-3, 8-11, 16-19, 24-27 and lane 1
// elements 4-7, 12-15, 20-23, 28-31. About 0.8 instructions per element instead of 1.2 for the path below.
__attribute__((target("avx2,fma"))) static void dequantize_segment_avx2_32(const uint8_t* packed,
                                                                           const float* absmax,
                                                                           int64_t blocksize, int64_t flat,
                                                                           int64_t count, float* out) {
  alignas(32) static const struct Planes {
    uint8_t bytes[4][32];
    Planes() {
      for (int c = 0; c < 16; ++c) {
        uint8_t value[4];
        std::memcpy(value, &kNF4Table[c], 4);
        for (int plane = 0; plane < 4; ++plane) {
          bytes[plane][c] = bytes[plane][c + 16] = value[plane];
        }
      }
    }
  } planes;
  const __m256i plane0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(planes.bytes[0]));
  const __m256i plane1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(planes.bytes[1]));
  const __m256i plane2 = _mm256_load_si256(reinterpret_cast<const __m256i*>(planes.bytes[2]));
  const __m256i plane3 = _mm256_load_si256(reinterpret_cast<const __m256i*>(planes.bytes[3]));
  const __m256i low_nibble = _mm256_set1_epi16(0x0F);
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (; count >= 32; flat += 32, out += 32, count -= 32) {
    // word i = byte i of the 16: its high nibble (element 2i) in the low byte, its low nibble above it.
    const __m256i words =
        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + flat / 2)));
    const __m256i codes_in_order =
        _mm256_or_si256(_mm256_srli_epi16(words, 4), _mm256_slli_epi16(_mm256_and_si256(words, low_nibble), 8));
    const __m256i codes = _mm256_permutevar8x32_epi32(codes_in_order, order);
    const __m256i b0 = _mm256_shuffle_epi8(plane0, codes);
    const __m256i b1 = _mm256_shuffle_epi8(plane1, codes);
    const __m256i b2 = _mm256_shuffle_epi8(plane2, codes);
    const __m256i b3 = _mm256_shuffle_epi8(plane3, codes);
    const __m256i b01_low = _mm256_unpacklo_epi8(b0, b1), b01_high = _mm256_unpackhi_epi8(b0, b1);
    const __m256i b23_low = _mm256_unpacklo_epi8(b2, b3), b23_high = _mm256_unpackhi_epi8(b2, b3);
    const __m256 scale = _mm256_set1_ps(absmax[flat / blocksize]);
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(b01_low, b23_low)), scale));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(b01_low, b23_low)), scale));
    _mm256_storeu_ps(out + 16, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(b01_high, b23_high)), scale));
    _mm256_storeu_ps(out + 24, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(b01_high, b23_high)), scale));
  }
  dequantize_segment_portable(packed, absmax, blocksize, flat, count, out);
}

// 16 elements per step from 8 bytes. Steps start at flat indices that are multiples of 16, so with a
// blocksize that is a multiple of 16 a step never straddles two absmax blocks.
__attribute__((target("avx2,fma"))) static void dequantize_segment_avx2(const uint8_t* packed,
                                                                        const float* absmax,
                                                                        int64_t blocksize, int64_t flat,
                                                                        int64_t count, float* out) {
  if (blocksize % 16 != 0) {
    dequantize_segment_portable(packed, absmax, blocksize, flat, count, out);
    return;
  }
  if (blocksize % 32 == 0) {
    const int64_t head32 = std::min(count, (32 - flat % 32) % 32);
    dequantize_segment_portable(packed, absmax, blocksize, flat, head32, out);
    dequantize_segment_avx2_32(packed, absmax, blocksize, flat + head32, count - head32, out + head32);
    return;
  }
  const int64_t head = std::min(count, (16 - flat % 16) % 16);
  dequantize_segment_portable(packed, absmax, blocksize, flat, head, out);
  flat += head;
  out += head;
  count -= head;

  const __m256 table_low = _mm256_load_ps(kNF4Table);
  const __m256 table_high = _mm256_load_ps(kNF4Table + 8);
  const __m256i low_nibble = _mm256_set1_epi32(0x0F);
  for (; count >= 16; flat += 16, out += 16, count -= 16) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + flat / 2));
    const __m256i widened = _mm256_cvtepu8_epi32(bytes);  // b0..b7
    const __m256i high_codes = _mm256_srli_epi32(widened, 4);
    const __m256i low_codes = _mm256_and_si256(widened, low_nibble);
    // unpack interleaves within 128-bit lanes: [h0 l0 h1 l1 | h4 l4 h5 l5] and [h2 l2 h3 l3 | h6 l6 h7 l7].
    const __m256i pairs_a = _mm256_unpacklo_epi32(high_codes, low_codes);
    const __m256i pairs_b = _mm256_unpackhi_epi32(high_codes, low_codes);
    const __m256i codes_0_7 = _mm256_permute2x128_si256(pairs_a, pairs_b, 0x20);
    const __m256i codes_8_15 = _mm256_permute2x128_si256(pairs_a, pairs_b, 0x31);
    const __m256 scale = _mm256_set1_ps(absmax[flat / blocksize]);
    _mm256_storeu_ps(out, _mm256_mul_ps(nf4_lookup_avx2(codes_0_7, table_low, table_high), scale));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(nf4_lookup_avx2(codes_8_15, table_low, table_high), scale));
  }
  dequantize_segment_portable(packed, absmax, blocksize, flat, count, out);
}
#endif

inline bool cpu_has_avx2() {
#ifdef FASTLORA_X86
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has_avx2;
#else
  return false;
#endif
}

// Tests switch the AVX2 paths off to exercise the portable ones on AVX2 machines.
inline std::atomic<bool>& avx2_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

inline bool use_avx2() { return cpu_has_avx2() && avx2_enabled().load(std::memory_order_relaxed); }

// out[0:count] = W.flat[flat:flat+count] in fp32.
inline void dequantize_segment(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t flat,
                               int64_t count, float* out) {
#ifdef FASTLORA_X86
  if (use_avx2()) {
    dequantize_segment_avx2(packed, absmax, blocksize, flat, count, out);
    return;
  }
#endif
  dequantize_segment_portable(packed, absmax, blocksize, flat, count, out);
}

}  // namespace fastlora
