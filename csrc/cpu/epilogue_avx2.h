// The AVX2 GEMMs' epilogue (gemm.cpp's strips, int8_avx2.cpp) on a tile of up to `rows_max` rows x
// one strip of 16 columns: out = act(sums * x_scale[i] * w_scale + bias) in p.dtype, rounded as the
// GEMV's epilogue rounds (gemv.cpp: a product, a product, a sum; each factor 1 and the bias 0
// where absent). The strip's scales and bias are loaded once for the tile, GELU (activation.h's
// gelu_row) runs in one call for it and fp32 rows are stored from the registers, masked only in
// a strip's last columns: the GEMV's epilogue per row of 16 (a call, its loops' ends, a copy) and
// masked stores (slow on AMD) ran the AVX2 GEMMs 2-11% slower on all-MiniLM-L6-v2's shapes at
// 23-64 rows (one thread, AMD EPYC, Zen 3).
// Include only where TRANSFUSE_X86_MULTIVERSION is set.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "activation.h"
#include "convert.h"
#include "gemm.h"

namespace transfuse::cpu {

TRANSFUSE_AVX2_FMA inline __m256 load_sums8(const float* from) { return _mm256_loadu_ps(from); }
TRANSFUSE_AVX2_FMA inline __m256 load_sums8(const int32_t* from) {  // (rounded to nearest)
  return _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
}

// 8 floats to `to`: all of them where `full`, else the lanes of `inside` (AMD's masked stores
// are slow: most strips are whole).
TRANSFUSE_AVX2_FMA inline void store8(float* to, __m256 value, bool full, __m256i inside) {
  if (full)
    _mm256_storeu_ps(to, value);
  else
    _mm256_maskstore_ps(to, inside, value);
}

// Rows r < rows of out from sums[r][0..cols): rows i0 + r, columns [j, j + cols), cols <= 16.
template <int rows_max, typename Sum>
TRANSFUSE_AVX2_FMA void store_tile_avx2(const GemmParams& p, const Sum (*sums)[16], int64_t rows,
                                        int64_t i0, int64_t j, int64_t cols) {
  const bool full = cols == 16;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i inside[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols)), lanes),
                             _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols) - 8), lanes)};
  __m256 w_scale[2], bias[2];
  for (int h = 0; h < 2; ++h) {
    w_scale[h] = !p.w_scale ? _mm256_set1_ps(1.f)
                 : full     ? _mm256_loadu_ps(p.w_scale + j + 8 * h)
                            : _mm256_maskload_ps(p.w_scale + j + 8 * h, inside[h]);
    bias[h] = !p.bias ? _mm256_setzero_ps()
              : full  ? _mm256_loadu_ps(p.bias + j + 8 * h)
                      : _mm256_maskload_ps(p.bias + j + 8 * h, inside[h]);
  }
  // fp32 without GELU: stored from the registers; else staged for GELU and the conversion
  const bool direct = p.dtype == DType::f32 && !p.gelu;
  float* const out = static_cast<float*>(p.out) + i0 * p.n + j;  // (fp32)
  alignas(32) float values[rows_max][16];
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 row_scale = _mm256_set1_ps(p.x_scale ? p.x_scale[i0 + r] : 1.f);
    for (int h = 0; h < 2; ++h) {
      const __m256 value = _mm256_add_ps(
          _mm256_mul_ps(_mm256_mul_ps(load_sums8(sums[r] + 8 * h), row_scale), w_scale[h]),
          bias[h]);
      if (direct)
        store8(out + r * p.n + 8 * h, value, full, inside[h]);
      else
        _mm256_store_ps(values[r] + 8 * h, value);
    }
  }
  if (direct) return;
  alignas(32) float activated[rows_max][16];
  const float(*result)[16] = values;
  if (p.gelu) {
    gelu_row(values[0], activated[0], rows * 16, p.approximate);
    result = activated;
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (p.dtype == DType::f32) {
      for (int h = 0; h < 2; ++h)
        store8(out + r * p.n + 8 * h, _mm256_load_ps(result[r] + 8 * h), full, inside[h]);
    } else {
      store_row(result[r], p.dtype,
                static_cast<char*>(p.out) + ((i0 + r) * p.n + j) * dtype_size(p.dtype), cols);
    }
  }
}

}  // namespace transfuse::cpu
