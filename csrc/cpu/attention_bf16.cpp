// The bf16 products of the CPU attention forward; see attention_bf16.h for the math and layouts.
// product_pairs is a register-blocked micro-kernel as gemm_bf16.cpp's: 6 rows of A x up to 4
// vectors of B (24 fp32 accumulators), per pair of the depth up to 4 vector loads of B, 6 broadcasts
// of a pair of A and up to 24 vdpbf16ps.
#include "attention_bf16.h"

#include <algorithm>

#include "multiversion.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include "transpose_avx512.h"
#endif

namespace transfuse::cpu {

#ifdef TRANSFUSE_X86_MULTIVERSION
namespace {

#define TRANSFUSE_ATTENTION_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int kBlockRows = 6;

// acc + the dot products of the pairs of a and b in each fp32 lane (vdpbf16ps), as inline
// assembly: GCC keeps intrinsic accumulators of such instructions in memory (gemm_bf16.cpp).
TRANSFUSE_ATTENTION_BF16 inline __m512 dot_add(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// The first `count` elements of 16 (or 32) set.
inline __mmask16 first16(int64_t count) {
  return __mmask16((1u << std::clamp<int64_t>(count, 0, 16)) - 1);
}
inline __mmask32 first32(int64_t count) {
  return count >= 32 ? ~__mmask32(0) : __mmask32((1u << std::max<int64_t>(count, 0)) - 1);
}

// C rows [0, R) x vectors [0, VECTORS) of product_pairs, in registers.
template <int R, int VECTORS>
TRANSFUSE_ATTENTION_BF16 inline void product_block(int64_t pairs, const uint32_t* a, int64_t lda,
                                                   const uint32_t* b, int64_t ldb, float* c,
                                                   int64_t ldc, bool accumulate, float scale) {
  __m512 acc[R][VECTORS];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < VECTORS; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    __m512i column[VECTORS];
#pragma GCC unroll 4
    for (int v = 0; v < VECTORS; ++v) column[v] = _mm512_loadu_si512(b + t * ldb + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i pair = _mm512_set1_epi32(int32_t(a[r * lda + t]));
#pragma GCC unroll 4
      for (int v = 0; v < VECTORS; ++v) acc[r][v] = dot_add(acc[r][v], pair, column[v]);
    }
  }
  const __m512 factor = _mm512_set1_ps(accumulate ? 1.f : scale);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < VECTORS; ++v)
      _mm512_storeu_ps(c + r * ldc + 16 * v, _mm512_mul_ps(acc[r][v], factor));
}

// Rows [0, rows) of a column block for rows < R: the block of exactly `rows` rows.
template <int VECTORS, int R = kBlockRows - 1>
TRANSFUSE_ATTENTION_BF16 inline void product_rest(int64_t rows, int64_t pairs, const uint32_t* a,
                                                  int64_t lda, const uint32_t* b, int64_t ldb,
                                                  float* c, int64_t ldc, bool accumulate,
                                                  float scale) {
  if constexpr (R > 0) {
    if (rows == R)
      return product_block<R, VECTORS>(pairs, a, lda, b, ldb, c, ldc, accumulate, scale);
    product_rest<VECTORS, R - 1>(rows, pairs, a, lda, b, ldb, c, ldc, accumulate, scale);
  }
}

// All m rows of a column block: blocks of kBlockRows, then the rest.
template <int VECTORS>
TRANSFUSE_ATTENTION_BF16 void product_columns(int64_t m, int64_t pairs, const uint32_t* a,
                                              int64_t lda, const uint32_t* b, int64_t ldb, float* c,
                                              int64_t ldc, bool accumulate, float scale) {
  int64_t i = 0;
  for (; i + kBlockRows <= m; i += kBlockRows)
    product_block<kBlockRows, VECTORS>(pairs, a + i * lda, lda, b, ldb, c + i * ldc, ldc,
                                       accumulate, scale);
  product_rest<VECTORS>(m - i, pairs, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate,
                        scale);
}

}  // namespace

bool has_attention_bf16() {
  static const bool has = vector_isa() == VectorIsa::avx512 &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

TRANSFUSE_ATTENTION_BF16 void pack_key_pairs(const uint16_t* k, int64_t stride, int64_t keys,
                                             int64_t head_dim, int64_t groups, uint32_t* out,
                                             int64_t ld) {
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const __mmask32 inside = first32(head_dim - 2 * g0);
    const int64_t count = std::min<int64_t>(16, groups - g0);
    for (int64_t j0 = 0; j0 < ld; j0 += 16) {
      __m512i rows[16], columns[16];
      for (int64_t l = 0; l < 16; ++l)
        rows[l] = j0 + l < keys ? _mm512_maskz_loadu_epi16(inside, k + (j0 + l) * stride + 2 * g0)
                                : _mm512_setzero_si512();
      transpose16(rows, columns);
      for (int64_t g = 0; g < count; ++g) _mm512_storeu_si512(out + (g0 + g) * ld + j0, columns[g]);
    }
  }
}

TRANSFUSE_ATTENTION_BF16 void pack_value_pairs(const uint16_t* v, int64_t stride, int64_t keys,
                                               int64_t head_dim, uint32_t* out, int64_t ld) {
  // One row as 16 words per 16 elements, its bf16 bits in the low or high half.
  auto widened = [&](int64_t row, int64_t d0) TRANSFUSE_ATTENTION_BF16 {
    return row < keys ? _mm512_cvtepu16_epi32(
                            _mm256_maskz_loadu_epi16(first16(head_dim - d0), v + row * stride + d0))
                      : _mm512_setzero_si512();
  };
  for (int64_t t = 0; t < (keys + 1) / 2; ++t)
    for (int64_t d0 = 0; d0 < ld; d0 += 16)
      _mm512_storeu_si512(out + t * ld + d0,
                          _mm512_or_si512(widened(2 * t, d0),
                                          _mm512_slli_epi32(widened(2 * t + 1, d0), 16)));
}

TRANSFUSE_ATTENTION_BF16 void probability_pairs(const float* p, int64_t ld_p, int64_t rows,
                                                int64_t width, uint32_t* out, int64_t ld_out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ld_out + j / 2),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p + r * ld_p + j)));
}

TRANSFUSE_ATTENTION_BF16 void product_pairs(int64_t m, int64_t n, int64_t pairs, const uint32_t* a,
                                            int64_t lda, const uint32_t* b, int64_t ldb, float* c,
                                            int64_t ldc, bool accumulate, float scale) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64)
    product_columns<4>(m, pairs, a, lda, b + j, ldb, c + j, ldc, accumulate, scale);
  for (; j + 32 <= n; j += 32)
    product_columns<2>(m, pairs, a, lda, b + j, ldb, c + j, ldc, accumulate, scale);
  for (; j < n; j += 16)
    product_columns<1>(m, pairs, a, lda, b + j, ldb, c + j, ldc, accumulate, scale);
}

#else
bool has_attention_bf16() { return false; }
void pack_key_pairs(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void pack_value_pairs(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void probability_pairs(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void product_pairs(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t,
                   float*, int64_t, bool, float) {}
#endif

}  // namespace transfuse::cpu
