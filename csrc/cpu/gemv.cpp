// The CPU GEMV of transfuse's linear for a few rows of x (decoding), on AVX-512 or AVX2 with FMA
// (the math is in common/gemm.h): fp32 or bf16 weights read once, as stored, with no packing.
// Each weight is used by at most a few rows of x, so the call is bound by the weights' bytes over
// memory bandwidth: each thread streams a contiguous range of weight rows, 4 rows at a time
// sharing every load of x (x, in fp32, stays in L1), each row prefetching the row four tiles
// ahead. bf16 weights are widened exactly to fp32 (a shift), so every product is exact and the
// sums are fp32 FMAs.
// Up to 4 rows of x share each weight load; more rows (up to kGemvMaxRows) take the same tile of
// weight rows again from L1/L2. The two ISAs differ only in the tile's dot products (16 or 8
// lanes, so in the order of the fp32 sums).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "activation.h"
#include "convert.h"
#include "gemm.h"
#include "multiversion.h"
#include "threads.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include "bf16_avx512.h"
#endif

namespace transfuse::cpu {

#ifdef TRANSFUSE_X86_MULTIVERSION
namespace {

// out = act(sums * x_scale[i] * w_scale + bias) in p.dtype for row i of out, columns
// [j, j + cols), cols <= 64 (sums is overwritten).
void store_epilogue_row(const GemmParams& p, float* sums, int64_t i, int64_t j, int64_t cols) {
  const float row_scale = p.x_scale ? p.x_scale[i] : 1.f;
  for (int64_t c = 0; c < cols; ++c)
    sums[c] = sums[c] * row_scale * (p.w_scale ? p.w_scale[j + c] : 1.f) +
              (p.bias ? p.bias[j + c] : 0.f);
  float activated[64];
  if (p.gelu) gelu_row(sums, activated, cols, p.approximate);
  store_row(p.gelu ? activated : sums, p.dtype,
            static_cast<char*>(p.out) + (i * p.n + j) * dtype_size(p.dtype), cols);
}

constexpr int64_t kTileCols = 4;                 // weight rows sharing each load of x
constexpr int64_t kTileRows = 4;                 // rows of x sharing each load of the weights
constexpr int64_t kRowsPerBlock = 16;            // weight rows a thread takes at a time
constexpr int64_t kPrefetchRows = 4 * kTileCols;
constexpr int64_t kMinWorkPerThread = 1 << 15;   // multiply-adds (threads.h)

// sums[r][c] = sum_kk x[r * k + kk] * float(w[c][kk]) for rows r < R of x (R = 1..4, the
// function at index R - 1) and kTileCols weight rows, on one ISA.
template <typename Weight>
using DotTile = void (*)(const float* x, const Weight* const* w, int64_t k,
                         float sums[kTileRows][kTileCols]);

// 16 weights of a row from `from` as fp32 (bf16 widened exactly), zeros where mask is clear.
TRANSFUSE_AVX512BW inline __m512 load_weights(const float* from, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, from);
}
TRANSFUSE_AVX512BW inline __m512 load_weights(const uint16_t* from, __mmask16 mask) {
  return float_of_bf16(_mm256_maskz_loadu_epi16(mask, from));
}

// sums[r][c] = sum_kk x[r * k + kk] * float(w[c][kk]) for R rows of x and kTileCols weight rows.
template <int R, typename Weight>
TRANSFUSE_AVX512BW void dot_tile(const float* x, const Weight* const* w, int64_t k,
                                 float sums[kTileRows][kTileCols]) {
  constexpr int64_t kPerLine = 64 / sizeof(Weight);  // weights per cache line
  __m512 acc[R][kTileCols];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 16) {
    const __mmask16 mask = k - kk >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - kk)) - 1);
    __m512 weights[kTileCols];
#pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) {
      if (kk % kPerLine == 0) _mm_prefetch(w[c] + kk + kPrefetchRows * k, _MM_HINT_T1);
      weights[c] = load_weights(w[c] + kk, mask);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * k + kk);
#pragma GCC unroll 4
      for (int c = 0; c < kTileCols; ++c) acc[r][c] = _mm512_fmadd_ps(xv, weights[c], acc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) sums[r][c] = _mm512_reduce_add_ps(acc[r][c]);
}

// 8 weights of a row from `from` as fp32 (bf16 widened exactly).
TRANSFUSE_AVX2_FMA inline __m256 load_weights8(const float* from) { return _mm256_loadu_ps(from); }
TRANSFUSE_AVX2_FMA inline __m256 load_weights8(const uint16_t* from) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
inline float weight_as_float(float w) { return w; }
inline float weight_as_float(uint16_t w) { return float_from_bits(uint32_t(w) << 16); }

TRANSFUSE_AVX2_FMA inline float sum_of_lanes(__m256 v) {
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// dot_tile on AVX2: 8 lanes, the k tail past the last full 8 added one term at a time.
template <int R, typename Weight>
TRANSFUSE_AVX2_FMA void dot_tile_avx2(const float* x, const Weight* const* w, int64_t k,
                                      float sums[kTileRows][kTileCols]) {
  constexpr int64_t kPerLine = 64 / sizeof(Weight);
  __m256 acc[R][kTileCols];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t full = k - k % 8;
  for (int64_t kk = 0; kk < full; kk += 8) {
    __m256 weights[kTileCols];
#pragma GCC unroll 4
    for (int c = 0; c < kTileCols; ++c) {
      if (kk % kPerLine == 0) _mm_prefetch(w[c] + kk + kPrefetchRows * k, _MM_HINT_T1);
      weights[c] = load_weights8(w[c] + kk);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + kk);
#pragma GCC unroll 4
      for (int c = 0; c < kTileCols; ++c) acc[r][c] = _mm256_fmadd_ps(xv, weights[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kTileCols; ++c) {
      float sum = sum_of_lanes(acc[r][c]);
      for (int64_t kk = full; kk < k; ++kk) sum += x[r * k + kk] * weight_as_float(w[c][kk]);
      sums[r][c] = sum;
    }
}

template <typename Weight>
constexpr DotTile<Weight> kAvx512Tiles[kTileRows] = {dot_tile<1>, dot_tile<2>, dot_tile<3>,
                                                     dot_tile<4>};
template <typename Weight>
constexpr DotTile<Weight> kAvx2Tiles[kTileRows] = {dot_tile_avx2<1>, dot_tile_avx2<2>,
                                                   dot_tile_avx2<3>, dot_tile_avx2<4>};

template <typename Weight>
void gemv_with(const GemmParams& p, const float* x, const DotTile<Weight>* tiles) {
  const Weight* w = static_cast<const Weight*>(p.w);
  const int64_t blocks = (p.n + kRowsPerBlock - 1) / kRowsPerBlock;
  in_team(threads_for(p.num_threads, blocks, p.m * p.n * p.k, kMinWorkPerThread), [&]() {
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t j_begin = block * kRowsPerBlock, j_end = std::min(p.n, j_begin + kRowsPerBlock);
      float staged[kGemvMaxRows][kRowsPerBlock];
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileCols) {
        const Weight* rows[kTileCols];  // past j_end: the last row again, its sums not kept
        for (int64_t c = 0; c < kTileCols; ++c) rows[c] = w + std::min(j0 + c, j_end - 1) * p.k;
        for (int64_t i0 = 0; i0 < p.m; i0 += kTileRows) {
          float sums[kTileRows][kTileCols];
          const float* x_rows = x + i0 * p.k;
          tiles[std::min(kTileRows, p.m - i0) - 1](x_rows, rows, p.k, sums);
          for (int64_t r = 0; r < std::min(kTileRows, p.m - i0); ++r)
            for (int64_t c = 0; c < std::min(kTileCols, j_end - j0); ++c)
              staged[i0 + r][j0 - j_begin + c] = sums[r][c];
        }
      }
      for (int64_t i = 0; i < p.m; ++i)
        store_epilogue_row(p, staged[i], i, j_begin, j_end - j_begin);
    }
  });
}

}  // namespace
#endif

bool has_gemv() {
#ifdef TRANSFUSE_X86_MULTIVERSION
  static const bool has = has_gemm() || (vector_isa() != VectorIsa::baseline &&
                                         __builtin_cpu_supports("avx2") &&
                                         __builtin_cpu_supports("fma"));
  return has;
#else
  return false;
#endif
}

bool gemv(const GemmParams& p) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (p.m > kGemvMaxRows || p.w_int8 || !has_gemv()) return false;
  const bool avx512 = has_gemm();
  if (p.dtype == DType::f32) {
    gemv_with<float>(p, static_cast<const float*>(p.x),
                     avx512 ? kAvx512Tiles<float> : kAvx2Tiles<float>);
    return true;
  }
  if (p.dtype != DType::bf16) return false;
  std::vector<float> x(p.m * p.k);  // exact
  load_row(p.x, DType::bf16, x.data(), p.m * p.k);
  gemv_with<uint16_t>(p, x.data(), avx512 ? kAvx512Tiles<uint16_t> : kAvx2Tiles<uint16_t>);
  return true;
#else
  return false;
#endif
}

}  // namespace transfuse::cpu
