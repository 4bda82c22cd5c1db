// bf16 <-> fp32 on 16 AVX-512 lanes, shared by the row conversions (convert.cpp), the norms' bf16
// residual add (norm.cpp), the bf16 GEMV's weights (gemv.cpp) and the GEMM epilogues
// (epilogue_avx512.h): the rounding of convert.cpp's float_to_bf16 (to nearest even, a NaN
// quieted), widening exact. Include only where TRANSFUSE_X86_MULTIVERSION is set.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace transfuse::cpu {

// Inlined into each caller (AVX-512 F and BW at least): as plain inline functions of a header they
// were called through the library's PLT.
#define TRANSFUSE_BF16_AVX512 inline __attribute__((always_inline, target("avx512f,avx512bw")))

// bf16 bits of fp32 lanes: (bits + 0x7fff + bit 16) >> 16, or the top half with the quiet bit set
// for a NaN.
TRANSFUSE_BF16_AVX512 __m512i bf16_bits(__m512 value) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i top = _mm512_srli_epi32(bits, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                        _mm512_and_si512(top, _mm512_set1_epi32(1)));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_or_epi32(rounded, nan, top, _mm512_set1_epi32(0x0040));
}

// The fp32 values of bf16 bits held in the low halves of 32-bit lanes (exact).
TRANSFUSE_BF16_AVX512 __m512 float_of_bf16_bits(__m512i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

// The fp32 values of 16 bf16 (exact).
TRANSFUSE_BF16_AVX512 __m512 float_of_bf16(__m256i halves) {
  return float_of_bf16_bits(_mm512_cvtepu16_epi32(halves));
}

// dst[l] = the low 16 bits of bits[l] for the lanes l of inside: narrowed in a register, then
// stored (vpmovdw straight to memory ran at a fraction of this rate on Zen 4).
TRANSFUSE_BF16_AVX512 void store_bf16(uint16_t* dst, __mmask16 inside, __m512i bits) {
  _mm512_mask_storeu_epi16(dst, inside, _mm512_castsi256_si512(_mm512_cvtepi32_epi16(bits)));
}

}  // namespace transfuse::cpu
