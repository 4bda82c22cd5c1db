// The CPU GEMV of transfuse's linear for a few rows of x (decoding), on AVX-512 (the math is in
// common/gemm.h): fp32 or bf16 weights read once, as stored, with no packing. Each weight is used
// by at most a few rows of x, so the call is bound by the weights' bytes over memory bandwidth:
// each thread streams a contiguous range of weight rows, 4 rows at a time sharing every load of x
// (x, in fp32, stays in L1), each row prefetching the row four tiles ahead. bf16 weights are
// widened exactly to fp32 (a shift), so every product is exact and the sums are fp32 FMAs.
// Up to 4 rows of x share each weight load; more rows (up to kGemvMaxRows) take the same tile of
// weight rows again from L1/L2.
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

constexpr int64_t kTileCols = 4;                 // weight rows sharing each load of x
constexpr int64_t kTileRows = 4;                 // rows of x sharing each load of the weights
constexpr int64_t kRowsPerBlock = 16;            // weight rows a thread takes at a time
constexpr int64_t kPrefetchRows = 4 * kTileCols;
constexpr int64_t kMinWorkPerThread = 1 << 15;   // multiply-adds (threads.h)

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

template <typename Weight>
TRANSFUSE_AVX512BW void gemv_avx512(const GemmParams& p, const float* x) {
  const Weight* w = static_cast<const Weight*>(p.w);
  const int64_t blocks = (p.n + kRowsPerBlock - 1) / kRowsPerBlock;
  in_team(threads_for(p.num_threads, blocks, p.m * p.n * p.k, kMinWorkPerThread),
          [&]() TRANSFUSE_AVX512BW {
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t j_begin = block * kRowsPerBlock, j_end = std::min(p.n, j_begin + kRowsPerBlock);
      float staged[kGemvMaxRows][kRowsPerBlock], activated[kRowsPerBlock];
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileCols) {
        const Weight* rows[kTileCols];  // past j_end: the last row again, its sums not kept
        for (int64_t c = 0; c < kTileCols; ++c) rows[c] = w + std::min(j0 + c, j_end - 1) * p.k;
        for (int64_t i0 = 0; i0 < p.m; i0 += kTileRows) {
          float sums[kTileRows][kTileCols];
          const float* x_rows = x + i0 * p.k;
          switch (std::min(kTileRows, p.m - i0)) {
            case 1: dot_tile<1>(x_rows, rows, p.k, sums); break;
            case 2: dot_tile<2>(x_rows, rows, p.k, sums); break;
            case 3: dot_tile<3>(x_rows, rows, p.k, sums); break;
            default: dot_tile<4>(x_rows, rows, p.k, sums); break;
          }
          for (int64_t r = 0; r < std::min(kTileRows, p.m - i0); ++r)
            for (int64_t c = 0; c < std::min(kTileCols, j_end - j0); ++c)
              staged[i0 + r][j0 - j_begin + c] = sums[r][c];
        }
      }
      const int64_t cols = j_end - j_begin;
      for (int64_t i = 0; i < p.m; ++i) {
        float* row = staged[i];
        for (int64_t c = 0; c < cols; ++c)
          row[c] = row[c] * (p.w_scale ? p.w_scale[j_begin + c] : 1.f) +
                   (p.bias ? p.bias[j_begin + c] : 0.f);
        if (p.gelu) gelu_row(row, activated, cols, p.approximate);
        store_row(p.gelu ? activated : row, p.dtype,
                  static_cast<char*>(p.out) + (i * p.n + j_begin) * dtype_size(p.dtype), cols);
      }
    }
  });
}

}  // namespace
#endif

bool gemv(const GemmParams& p) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (p.m > kGemvMaxRows || p.w_int8 || !has_gemm()) return false;
  if (p.dtype == DType::f32) {
    gemv_avx512<float>(p, static_cast<const float*>(p.x));
    return true;
  }
  if (p.dtype != DType::bf16) return false;
  std::vector<float> x(p.m * p.k);  // exact
  load_row(p.x, DType::bf16, x.data(), p.m * p.k);
  gemv_avx512<uint16_t>(p, x.data());
  return true;
#else
  return false;
#endif
}

}  // namespace transfuse::cpu
