// NF4 codes dequantized straight to bf16/fp16 with AVX-512, for the half base path (base_weight.h): the 16-entry
// table in one register, 16 elements per step, each computed in fp32 (table value * absmax, as bitsandbytes) and
// rounded in the register, where the AVX2 path writes an fp32 tile and rounds it in a second pass.
#pragma once

#include "half_convert.h"
#include "half_thin_avx512.h"  // use_avx512, the rounding stores
#include "nf4_dequant.h"

namespace fastlora {

#ifdef FASTLORA_X86
// out[0:count] = W.flat[flat:flat+count] rounded to T; blocksize a multiple of 16 (one scale per step).
template <typename T>
FASTLORA_AVX512 void dequantize_rounded_avx512(const uint8_t* packed, const float* absmax, int64_t blocksize,
                                               int64_t flat, int64_t count, T* out) {
  const auto portable = [&](int64_t start, int64_t n, T* dst) {
    alignas(64) float tile[16];
    dequantize_segment_portable(packed, absmax, blocksize, start, n, tile);
    store_rounded_portable(tile, n, dst);
  };
  const int64_t head = std::min(count, (16 - flat % 16) % 16);
  if (head > 0) portable(flat, head, out);
  flat += head, out += head, count -= head;
  const __m512 table = _mm512_load_ps(kNF4Table);
  // byte i of the step's 8 goes to lanes 2i (high nibble: shift 4) and 2i+1 (low nibble: shift 0)
  const __m512i spread = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  for (; count >= 16; flat += 16, out += 16, count -= 16) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + flat / 2)));
    const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(spread, bytes), shifts), nibble);
    const __m512 values = _mm512_mul_ps(_mm512_permutexvar_ps(codes, table), _mm512_set1_ps(absmax[flat / blocksize]));
    avx512::store(out, __mmask16(0xFFFF), values);
  }
  if (count > 0) portable(flat, count, out);
}
#endif

// Whether dequantize_rounded_avx512 serves this weight here.
inline bool nf4_rounded_avx512(int64_t blocksize) { return use_avx512() && blocksize % 16 == 0; }

}  // namespace fastlora
