// The end of the CPU GEMMs' epilogues (gemm.cpp, gemm_bf16.cpp, int8_vnni.cpp) on a row of fp32
// AVX-512 vectors: GELU, and the store in the output dtype straight from the registers, with the
// rounding of convert.cpp's rows (to nearest even; a NaN quieted for bf16; F16C's for fp16), whose
// AVX-512 bf16 rows (and norm.cpp's bf16 residual add) use bf16_bits and store_bf16 too.
// Include only where TRANSFUSE_X86_MULTIVERSION is set.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../common/norm.h"  // DType
#include "activation.h"

namespace transfuse::cpu {

// Inlined into each caller (AVX-512 F and BW at least): as plain inline functions of a header they
// were called through the library's PLT.
#define TRANSFUSE_EPILOGUE_AVX512 \
  inline __attribute__((always_inline, target("avx512f,avx512bw")))

// bf16 bits of fp32 lanes: (bits + 0x7fff + bit 16) >> 16, or the top half with the quiet bit set
// for a NaN (convert.cpp's float_to_bf16, 16 lanes at a time).
TRANSFUSE_EPILOGUE_AVX512 __m512i bf16_bits(__m512 value) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i top = _mm512_srli_epi32(bits, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                        _mm512_and_si512(top, _mm512_set1_epi32(1)));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_or_epi32(rounded, nan, top, _mm512_set1_epi32(0x0040));
}

// dst[l] = the low 16 bits of bits[l] for the lanes l of inside: narrowed in a register, then
// stored (vpmovdw straight to memory ran at a fraction of this rate on Zen 4).
TRANSFUSE_EPILOGUE_AVX512 void store_bf16(uint16_t* dst, __mmask16 inside, __m512i bits) {
  _mm512_mask_storeu_epi16(dst, inside, _mm512_castsi256_si512(_mm512_cvtepi32_epi16(bits)));
}

// dst[16 c + l] = dtype(values[c][l]) for the lanes l of inside[c], c < count.
template <int count>
TRANSFUSE_EPILOGUE_AVX512 void store_vectors(const __m512* values, const __mmask16* inside,
                                                 DType dtype, void* dst) {
  for (int c = 0; c < count; ++c) switch (dtype) {
      case DType::f32:
        _mm512_mask_storeu_ps(static_cast<float*>(dst) + 16 * c, inside[c], values[c]);
        break;
      case DType::bf16:
        store_bf16(static_cast<uint16_t*>(dst) + 16 * c, inside[c], bf16_bits(values[c]));
        break;
      case DType::f16:
        _mm512_mask_storeu_epi16(static_cast<uint16_t*>(dst) + 16 * c, inside[c],
                                 _mm512_castsi256_si512(_mm512_cvtps_ph(
                                     values[c], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        break;
    }
}

// values[c] = gelu(values[c]) for the first `cols` of the row's elements (activation.h's gelu_row;
// the lanes past them zero).
template <int count>
TRANSFUSE_EPILOGUE_AVX512 void gelu_vectors(__m512* values, const __mmask16* inside,
                                                int64_t cols, GeluApproximation approximate) {
  float staged[16 * count], activated[16 * count];
  for (int c = 0; c < count; ++c) _mm512_storeu_ps(staged + 16 * c, values[c]);
  gelu_row(staged, activated, cols, approximate);
  for (int c = 0; c < count; ++c) values[c] = _mm512_maskz_loadu_ps(inside[c], activated + 16 * c);
}

}  // namespace transfuse::cpu
