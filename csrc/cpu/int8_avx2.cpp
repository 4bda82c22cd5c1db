// The CPU int8 x int8 GEMM with its dequantizing epilogue on AVX2 without an int8 dot product
// (AMD Zen 2 and 3, Intel before Ice Lake): w8a8 where neither int8_vnni.cpp nor oneDNN's int8
// GEMM (which needs a dot product to be fast) runs. The math is in common/int8.h.
//
// acc[i, j] = sum_k x_q[i, k] * w[j, k], exact in int32. vpmaddubsw multiplies unsigned by signed
// bytes and adds adjacent pairs into int16, saturating; its unsigned side is |x_q| and its signed
// side w with x_q's sign (vpsignb; 0 where x_q is 0), so each product is x_q * w and each pair's
// sum, at most 2 * 128 * 127 = 32512 in magnitude, never saturates, as long as no weight is -128
// (which vpsignb cannot negate): the packing refuses such weights, and the caller takes another
// path. vpmaddwd by ones then adds pairs of pairs into int32 lanes. Per 32 byte products that is 4
// instructions (sign, maddubs, maddwd, add), which ran 1.4x the multiply-adds a cycle of fp32 FMAs
// on an AMD EPYC (Zen 3: 70 against 50 GMAC/s a core, weights in L1), on a quarter of their bytes.
// Blocking: the weights packed (pack_weight_int8_avx2, kept between calls, or per call) as strips
// of 16 rows, 4 of k at a time: strip[g][c][b] = w[16 s + c][4 g + b], one group of k = two
// vectors of 8 int32 lanes; tiles of up to 4 rows of x by one strip (8 accumulators, 2 vector
// loads of the strip and 8 broadcasts of x per group). Each thread takes strips, for one block of
// x's rows at a time (kept in L2); the strip stays in L1 over the block's tiles.
#include <algorithm>
#include <cstring>
#include <vector>

#include "buffer.h"
#include "gemm.h"
#include "int8.h"
#include "multiversion.h"
#include "threads.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include "epilogue_avx2.h"
#endif

namespace transfuse::cpu {

#ifdef TRANSFUSE_X86_MULTIVERSION
namespace {

constexpr int64_t kStripCols = 16;
constexpr int64_t kGroupBytes = 4 * kStripCols;  // one group of 4 k of a strip
constexpr int64_t kTileRows = 4;
constexpr int64_t kBlockRows = 64;              // rows of x per block: |x_q| and x_q in L2
constexpr int64_t kMinWorkPerThread = 1 << 18;  // multiply-adds (threads.h)

int64_t groups_of(int64_t k) { return (k + 3) / 4; }
int64_t strips_of(int64_t n) { return (n + kStripCols - 1) / kStripCols; }

bool holds_minus_128(const int8_t* w, int64_t count) {
  int found = 0;
  for (int64_t e = 0; e < count; ++e) found |= w[e] == -128;
  return found != 0;
}

// Strip s of w [n, k] (zeros past n and k), 4 bytes of k at a time.
void pack_strip(const int8_t* w, int64_t n, int64_t k, int64_t s, int8_t* strip) {
  const int64_t groups = groups_of(k), whole = k / 4;
  for (int64_t c = 0; c < kStripCols; ++c) {
    const int64_t j = s * kStripCols + c;
    int8_t* to = strip + c * 4;
    if (j >= n) {
      for (int64_t g = 0; g < groups; ++g) std::memset(to + g * kGroupBytes, 0, 4);
      continue;
    }
    const int8_t* row = w + j * k;
    for (int64_t g = 0; g < whole; ++g) std::memcpy(to + g * kGroupBytes, row + 4 * g, 4);
    for (int64_t kk = 4 * whole; kk < 4 * groups; ++kk)  // the last group, past k
      to[whole * kGroupBytes + kk % 4] = kk < k ? row[kk] : 0;
  }
}

void pack_strips(const int8_t* w, int64_t n, int64_t k, int8_t* packed, int num_threads) {
  const int64_t strips = strips_of(n), strip_bytes = groups_of(k) * kGroupBytes;
  in_team(threads_for(num_threads, strips, n * k, kMinWorkPerThread), [&]() {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) pack_strip(w, n, k, s, packed + s * strip_bytes);
  });
}

// abs[i, kk] = |x_q[i, kk]| (as unsigned: |-128| = 128) and sign[i, kk] = x_q[i, kk], each row
// padded with zeros to `stride`.
TRANSFUSE_AVX2_FMA void split_rows(const int8_t* x_q, int64_t m, int64_t k, int64_t stride,
                                   uint8_t* abs, int8_t* sign) {
  const int64_t whole = k - k % 32;
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* row = x_q + i * k;
    for (int64_t kk = 0; kk < whole; kk += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + kk));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sign + i * stride + kk), v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(abs + i * stride + kk), _mm256_abs_epi8(v));
    }
    for (int64_t kk = whole; kk < stride; ++kk) {
      const int8_t v = kk < k ? row[kk] : 0;
      sign[i * stride + kk] = v;
      abs[i * stride + kk] = uint8_t(v < 0 ? -int(v) : int(v));
    }
  }
}

// sums[r][c] = sum over the groups of |x|[r][4 g + b] * (w with x's sign)[g][c][b], rows r < R:
// the int32 products of R rows of x by one strip.
template <int R>
TRANSFUSE_AVX2_FMA __attribute__((noinline)) void tile_product(
    const uint8_t* x_abs, const int8_t* x_signed, int64_t stride, const int8_t* strip,
    int64_t groups, int32_t sums[kTileRows][kStripCols]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* vectors = strip + g * kGroupBytes;
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vectors)),
                  w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vectors + 32));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      int32_t magnitudes, signs;
      std::memcpy(&magnitudes, x_abs + r * stride + 4 * g, 4);
      std::memcpy(&signs, x_signed + r * stride + 4 * g, 4);
      const __m256i a = _mm256_set1_epi32(magnitudes), s = _mm256_set1_epi32(signs);
      acc[r][0] = _mm256_add_epi32(
          acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(w0, s)), ones));
      acc[r][1] = _mm256_add_epi32(
          acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(w1, s)), ones));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[r]), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[r] + 8), acc[r][1]);
  }
}

using TileProduct = void (*)(const uint8_t*, const int8_t*, int64_t, const int8_t*, int64_t,
                             int32_t[kTileRows][kStripCols]);
constexpr TileProduct kTileProducts[kTileRows] = {tile_product<1>, tile_product<2>,
                                                  tile_product<3>, tile_product<4>};

}  // namespace
#endif

bool has_int8_avx2() {
#ifdef TRANSFUSE_X86_MULTIVERSION
  return vector_isa() == VectorIsa::avx2 && has_gemv() && !has_int8_dot();
#else
  return false;
#endif
}

int64_t packed_weight_bytes_int8_avx2(int64_t n, int64_t k) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (has_int8_avx2()) return strips_of(n) * groups_of(k) * kGroupBytes;
#endif
  return 0;
}

bool pack_weight_int8_avx2(const int8_t* w, int64_t n, int64_t k, int8_t* packed,
                           int num_threads) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (!has_int8_avx2() || holds_minus_128(w, n * k)) return false;
  pack_strips(w, n, k, packed, num_threads);
  return true;
#else
  return false;
#endif
}

bool int8_linear_avx2(const Int8LinearParams& p) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (!has_int8_avx2()) return false;
  const int64_t groups = groups_of(p.k), stride = 4 * groups, strips = strips_of(p.n);
  std::unique_ptr<int8_t[]> packed_here;
  const int8_t* packed = p.w_packed;
  if (!packed) {
    if (holds_minus_128(p.w, p.n * p.k)) return false;
    packed_here = uninitialized<int8_t>(packed_weight_bytes_int8_avx2(p.n, p.k));
    pack_strips(p.w, p.n, p.k, packed_here.get(), p.num_threads);
    packed = packed_here.get();
  }
  const auto x_abs = uninitialized<uint8_t>(p.m * stride);
  const auto x_signed = uninitialized<int8_t>(p.m * stride);
  split_rows(p.x_q, p.m, p.k, stride, x_abs.get(), x_signed.get());
  const std::vector<float> bias = fp32_bias(p);
  GemmParams epilogue;  // out = acc * s_x * s_w + bias
  epilogue.x_scale = p.x_scale;
  epilogue.w_scale = p.w_scale;
  epilogue.bias = bias.empty() ? nullptr : bias.data();
  epilogue.out = p.out;
  epilogue.n = p.n;
  epilogue.dtype = p.dtype;
  const int64_t strip_bytes = groups * kGroupBytes;
  in_team(threads_for(p.num_threads, strips, p.m * p.n * p.k, kMinWorkPerThread), [&]() {
    for (int64_t block = 0; block < p.m; block += kBlockRows) {
      const int64_t block_end = std::min(p.m, block + kBlockRows);
#pragma omp for schedule(static)
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t col = s * kStripCols, cols = std::min(kStripCols, p.n - col);
        for (int64_t i0 = block; i0 < block_end; i0 += kTileRows) {
          const int64_t rows = std::min(kTileRows, block_end - i0);
          int32_t sums[kTileRows][kStripCols];
          kTileProducts[rows - 1](x_abs.get() + i0 * stride, x_signed.get() + i0 * stride,
                                  stride, packed + s * strip_bytes, groups, sums);
          if (p.acc)
            for (int64_t r = 0; r < rows; ++r)
              std::copy_n(sums[r], cols, p.acc + (i0 + r) * p.n + col);
          else
            store_tile_avx2<kTileRows>(epilogue, sums, rows, i0, col, cols);
        }
      }
    }
  });
  return true;
#else
  return false;
#endif
}

}  // namespace transfuse::cpu
