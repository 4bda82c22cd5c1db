// The end of the CPU GEMMs' epilogues (gemm.cpp, gemm_bf16.cpp, int8_vnni.cpp) on fp32 AVX-512
// vectors: a tile's scale, bias and GELU, the store in the output dtype from the registers, with
// the rounding of convert.cpp's rows (to nearest even; a NaN quieted for bf16, bf16_avx512.h;
// F16C's for fp16).
// Include only where TRANSFUSE_X86_MULTIVERSION is set.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../common/norm.h"  // DType
#include "activation.h"
#include "bf16_avx512.h"

namespace transfuse::cpu {

#define TRANSFUSE_EPILOGUE_AVX512 TRANSFUSE_BF16_AVX512  // inlined, as bf16_avx512.h's

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

// A tile's rows r < `rows` of the output: act(sums[r] * w_scale + bias) in `dtype`, the lanes of
// `inside`, row r at out + r * row_stride elements; act GELU (activation.h's gelu_row, in one
// call for the tile: per row, the call and its loop's ends cost as much as the GELU of 64 values)
// or none.
template <int rows_max, int count>
TRANSFUSE_EPILOGUE_AVX512 void store_tile(const __m512 (*sums)[count], int64_t rows,
                                          const __m512* w_scale, const __m512* bias,
                                          const __mmask16* inside, bool gelu,
                                          GeluApproximation approximate, DType dtype, void* out,
                                          int64_t row_stride) {
  __m512 values[rows_max][count];
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < count; ++c)
      values[r][c] = _mm512_add_ps(_mm512_mul_ps(sums[r][c], w_scale[c]), bias[c]);
  if (gelu) {
    float staged[rows_max * 16 * count], activated[rows_max * 16 * count];
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < count; ++c)
        _mm512_storeu_ps(staged + (r * count + c) * 16, values[r][c]);
    gelu_row(staged, activated, rows * 16 * count, approximate);
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < count; ++c)
        values[r][c] = _mm512_loadu_ps(activated + (r * count + c) * 16);
  }
  for (int64_t r = 0; r < rows; ++r)
    store_vectors<count>(values[r], inside, dtype,
                         static_cast<char*>(out) + r * row_stride * dtype_size(dtype));
}

}  // namespace transfuse::cpu
