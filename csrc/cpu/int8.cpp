// CPU int8 kernels. The math is stated in common/int8.h. Loops are plain C++ that GCC vectorizes
// (compiled for AVX-512, AVX2 and baseline, picked at load time), but the one-token GEMV
// (intrinsics); OpenMP over rows (quantize, epilogue) or over blocks of weight rows (w8a16).
#include "int8.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "convert.h"
#include "multiversion.h"
#include "threads.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>
#endif

namespace transfuse::cpu {
namespace {

constexpr int64_t kWeightRowsPerBlock = 16;  // w8a16: weight rows a thread takes at a time

const char* at_row(const void* base, DType dtype, int64_t row, int64_t cols) {
  return static_cast<const char*>(base) + row * cols * dtype_size(dtype);
}

// q[k] = clamp(rint(x[k] / scale), -127, 127) for the whole vectors of x[0, n) (GCC leaves this
// loop scalar); returns how far it got.
#ifdef TRANSFUSE_X86_MULTIVERSION
__attribute__((target("avx512f")))
int64_t quantize_vectors_avx512(const float* x, int64_t n, float scale, int8_t* q) {
  const __m512 divisor = _mm512_set1_ps(scale), high = _mm512_set1_ps(127.f),
               low = _mm512_set1_ps(-127.f);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), divisor),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(high, _mm512_max_ps(low, v)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(i));
  }
  return k;
}
#endif

int64_t quantize_vectors(const float* x, int64_t n, float scale, int8_t* q) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (vector_isa() == VectorIsa::avx512) return quantize_vectors_avx512(x, n, scale, q);
#endif
  return 0;
}

// absmax of x[0, n), then q = clamp(rint(x / scale)) with scale = absmax / 127 (1 where 0).
// absmax is reduced on the bit patterns of |x| (for non-negative floats the integer order is the
// float order, and NaN patterns lie above inf), so a NaN is not skipped as std::max would skip
// it. A row holding NaN or inf gets scale NaN and q = 0 (its w8a8 outputs are then NaN).
TRANSFUSE_MULTIVERSION float quantize_row(const float* x, int64_t n, int8_t* q) {
  uint32_t absmax_bits = 0;
  for (int64_t k = 0; k < n; ++k) absmax_bits = std::max(absmax_bits, bits_of(x[k]) & 0x7fffffffu);
  if (absmax_bits >= 0x7f800000u) {  // inf or NaN in the row
    std::memset(q, 0, static_cast<size_t>(n));
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float absmax = float_from_bits(absmax_bits);
  const float scale = absmax / 127.f > 0.f ? absmax / 127.f : 1.f;
  for (int64_t k = quantize_vectors(x, n, scale, q); k < n; ++k) {
    const float v = std::nearbyint(x[k] / scale);  // IEEE division, round half to even
    q[k] = static_cast<int8_t>(static_cast<int32_t>(std::min(127.f, std::max(-127.f, v))));
  }
  return scale;
}

// out[j] = acc[j] * s_x * s_w[j] + bias[j] for one row.
TRANSFUSE_MULTIVERSION void dequantize_row(const int32_t* acc, float row_scale, const float* w_scale,
                                           const float* bias, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = static_cast<float>(acc[j]) * row_scale * w_scale[j] + (bias ? bias[j] : 0.f);
}

// 16 floats as a GCC vector (one AVX-512 register; split in two or four where narrower).
typedef float Floats16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kTileRows = 4;   // rows of x per tile
constexpr int64_t kTileCols = 4;   // weight rows per tile
constexpr int64_t kChunk = 256;    // k elements of the weight rows widened to fp32 at a time

// out[0, n) = float(w[0, n)): a plain loop GCC vectorizes (sign extension, then conversion).
TRANSFUSE_MULTIVERSION void widen(const int8_t* w, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(w[k]);
}

// sums[r * kTileCols + c] = sum_k x[r][k] * float(w[c][k]) for a 4 x 4 tile: the weight rows
// are widened a chunk at a time into L1, then 4 x 4 vector accumulators take each loaded x
// vector four times and each widened w vector four times (several tokens; one token has
// dot_tile_one_row).
TRANSFUSE_MULTIVERSION void dot_tile(const float* const* x, const int8_t* const* w, int64_t n,
                                     float* sums) {
  Floats16 acc[kTileRows][kTileCols] = {};
  float widened[kTileCols][kChunk];
  float tail[kTileRows][kTileCols] = {};
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    const int64_t len = std::min(kChunk, n - k0), vectors = len / kLanes * kLanes;
    for (int64_t c = 0; c < kTileCols; ++c) widen(w[c] + k0, len, widened[c]);
    for (int64_t k = 0; k < vectors; k += kLanes) {
      Floats16 wf[kTileCols];
      for (int64_t c = 0; c < kTileCols; ++c)
        std::memcpy(&wf[c], widened[c] + k, sizeof(wf[c]));
      for (int64_t r = 0; r < kTileRows; ++r) {
        Floats16 xv;
        std::memcpy(&xv, x[r] + k0 + k, sizeof(xv));
        for (int64_t c = 0; c < kTileCols; ++c) acc[r][c] += xv * wf[c];
      }
    }
    for (int64_t r = 0; r < kTileRows; ++r)
      for (int64_t c = 0; c < kTileCols; ++c)
        for (int64_t k = vectors; k < len; ++k) tail[r][c] += x[r][k0 + k] * widened[c][k];
  }
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int64_t c = 0; c < kTileCols; ++c) {
      float total = tail[r][c];
      for (int64_t l = 0; l < kLanes; ++l) total += acc[r][c][l];
      sums[r * kTileCols + c] = total;
    }
}

// sums[c] = sum_k x[k] * float(w[c][k]) for 4 weight rows and one token (decoding). Each weight
// is used once, so it is widened in registers (sign extension, conversion) right before its
// multiply instead of staged in L1 as dot_tile does; each x vector serves the 4 rows. With
// intrinsics: GCC's vectorizer turns a 16-byte widening into scalar conversions.
#ifdef TRANSFUSE_X86_MULTIVERSION
// The one-token GEMV streams its weights from DRAM once: each row of a tile prefetches the row
// kPrefetchRows further on (two tiles ahead; measured best of 0, 4, 8, 16, 32 on SmolLM's rows).
constexpr int64_t kPrefetchRows = 4 * kTileCols;

__attribute__((target("avx512f")))
int64_t dot_tile_one_row_avx512(const float* x, const int8_t* const* w, int64_t n, float* sums) {
  __m512 acc[kTileCols];
  for (auto& a : acc) a = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int64_t c = 0; c < kTileCols; ++c) {
      if ((k & 63) == 0) _mm_prefetch(w[c] + k + kPrefetchRows * n, _MM_HINT_T1);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[c] + k));
      acc[c] = _mm512_fmadd_ps(xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), acc[c]);
    }
  }
  for (int64_t c = 0; c < kTileCols; ++c) sums[c] = _mm512_reduce_add_ps(acc[c]);
  return k;
}

// The 4 x 4 tile of dot_tile for a few tokens on AVX-512: each 16 weights of a row widened in
// registers once and used by the 4 rows of x (named accumulators: GCC spills an array of them).
#define TRANSFUSE_W8A16_TILE_ROW(r)                                                      \
  {                                                                                      \
    const __m512 xv = _mm512_loadu_ps(x[r] + k);                                         \
    acc##r##0 = _mm512_fmadd_ps(xv, w0, acc##r##0);                                      \
    acc##r##1 = _mm512_fmadd_ps(xv, w1, acc##r##1);                                      \
    acc##r##2 = _mm512_fmadd_ps(xv, w2, acc##r##2);                                      \
    acc##r##3 = _mm512_fmadd_ps(xv, w3, acc##r##3);                                      \
  }
#define TRANSFUSE_W8A16_TILE_SUMS(r)                                                     \
  sums[r * kTileCols] = _mm512_reduce_add_ps(acc##r##0);                                 \
  sums[r * kTileCols + 1] = _mm512_reduce_add_ps(acc##r##1);                             \
  sums[r * kTileCols + 2] = _mm512_reduce_add_ps(acc##r##2);                             \
  sums[r * kTileCols + 3] = _mm512_reduce_add_ps(acc##r##3);

__attribute__((target("avx512f")))
int64_t dot_tile_avx512(const float* const* x, const int8_t* const* w, int64_t n, float* sums) {
  static_assert(kTileRows == 4 && kTileCols == 4, "the macros name a 4 x 4 tile");
  __m512 acc00, acc01, acc02, acc03, acc10, acc11, acc12, acc13, acc20, acc21, acc22, acc23,
      acc30, acc31, acc32, acc33;
  acc00 = acc01 = acc02 = acc03 = acc10 = acc11 = acc12 = acc13 = _mm512_setzero_ps();
  acc20 = acc21 = acc22 = acc23 = acc30 = acc31 = acc32 = acc33 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    if ((k & 63) == 0)
      for (int64_t c = 0; c < kTileCols; ++c)
        _mm_prefetch(w[c] + k + kPrefetchRows * n, _MM_HINT_T1);
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[0] + k)))),
                 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[1] + k)))),
                 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[2] + k)))),
                 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[3] + k))));
    TRANSFUSE_W8A16_TILE_ROW(0) TRANSFUSE_W8A16_TILE_ROW(1) TRANSFUSE_W8A16_TILE_ROW(2)
    TRANSFUSE_W8A16_TILE_ROW(3)
  }
  TRANSFUSE_W8A16_TILE_SUMS(0) TRANSFUSE_W8A16_TILE_SUMS(1) TRANSFUSE_W8A16_TILE_SUMS(2)
  TRANSFUSE_W8A16_TILE_SUMS(3)
  return k;
}

__attribute__((target("avx2")))
int64_t dot_tile_one_row_avx2(const float* x, const int8_t* const* w, int64_t n, float* sums) {
  __m256 acc[kTileCols];
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int64_t c = 0; c < kTileCols; ++c) {
      if ((k & 63) == 0) _mm_prefetch(w[c] + k + kPrefetchRows * n, _MM_HINT_T1);
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w[c] + k));
      acc[c] = _mm256_add_ps(acc[c],
                             _mm256_mul_ps(xv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))));
    }
  }
  for (int64_t c = 0; c < kTileCols; ++c) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[c]);
    sums[c] = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
              ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  }
  return k;
}
#endif

#ifdef TRANSFUSE_X86_MULTIVERSION
// acc[r][j] = sum_k x[r][k] * w[j][k] for weight rows [j0, j1) and the m tokens of x (rows of
// acc n long), exactly: 16 int8 of x and of a row widened to int16, their products summed in pairs
// into int32 (madd), 4 weight rows at a time sharing each widened x, 2 tokens at a time sharing
// each widened weight (more tokens take the tile again from L1), each row prefetching the row two
// tiles ahead (as the w8a16 GEMV).
template <int64_t Tokens>
__attribute__((target("avx2")))
void int8_gemv_tile_avx2(const int8_t* x, const int8_t* w, int64_t k, int64_t n, int64_t j,
                         int64_t rows, int32_t* acc) {
  const int64_t vectors = k / 16 * 16;
  __m256i sums[Tokens][kTileCols];
  for (auto& token : sums)
    for (auto& sum : token) sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < vectors; i += 16) {
    __m256i xv[Tokens];
    for (int64_t r = 0; r < Tokens; ++r)
      xv[r] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + r * k + i)));
    for (int64_t c = 0; c < rows; ++c) {
      const int8_t* row = w + (j + c) * k;
      if ((i & 63) == 0) _mm_prefetch(row + i + kPrefetchRows * k, _MM_HINT_T1);
      const __m256i wv =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
      for (int64_t r = 0; r < Tokens; ++r)
        sums[r][c] = _mm256_add_epi32(sums[r][c], _mm256_madd_epi16(xv[r], wv));
    }
  }
  for (int64_t r = 0; r < Tokens; ++r)
    for (int64_t c = 0; c < rows; ++c) {
      int32_t lanes[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), sums[r][c]);
      int32_t total = 0;
      for (int32_t lane : lanes) total += lane;
      const int8_t* row = w + (j + c) * k;
      for (int64_t i = vectors; i < k; ++i) total += int32_t(x[r * k + i]) * int32_t(row[i]);
      acc[r * n + j + c] = total;
    }
}

void int8_gemv_rows_avx2(const int8_t* x, int64_t m, const int8_t* w, int64_t k, int64_t n,
                         int64_t j0, int64_t j1, int32_t* acc) {
  for (int64_t j = j0; j < j1; j += kTileCols) {
    const int64_t rows = std::min(kTileCols, j1 - j);
    for (int64_t r = 0; r < m; r += 2) {
      if (m - r >= 2) {
        int8_gemv_tile_avx2<2>(x + r * k, w, k, n, j, rows, acc + r * n);
      } else {
        int8_gemv_tile_avx2<1>(x + r * k, w, k, n, j, rows, acc + r * n);
      }
    }
  }
}
#endif

void dot_tile_one_row(const float* const* x, const int8_t* const* w, int64_t n, float* sums) {
  int64_t done = -1;
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (vector_isa() == VectorIsa::avx512) done = dot_tile_one_row_avx512(x[0], w, n, sums);
  else if (vector_isa() == VectorIsa::avx2) done = dot_tile_one_row_avx2(x[0], w, n, sums);
#endif
  if (done < 0) {  // no intrinsics here: the vectorized tile, its four rows all this one
    const float* same[kTileRows];
    float tile[kTileRows * kTileCols];
    for (auto& row : same) row = x[0];
    dot_tile(same, w, n, tile);
    std::memcpy(sums, tile, kTileCols * sizeof(float));
    return;
  }
  for (int64_t c = 0; c < kTileCols; ++c)
    for (int64_t k = done; k < n; ++k) sums[c] += x[0][k] * static_cast<float>(w[c][k]);
}

// dot_tile for a few tokens: AVX-512 widens the weights in registers, else dot_tile.
void dot_tile_few_rows(const float* const* x, const int8_t* const* w, int64_t n, float* sums) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (vector_isa() == VectorIsa::avx512) {
    const int64_t done = dot_tile_avx512(x, w, n, sums);
    for (int64_t r = 0; r < kTileRows; ++r)
      for (int64_t c = 0; c < kTileCols; ++c)
        for (int64_t k = done; k < n; ++k)
          sums[r * kTileCols + c] += x[r][k] * static_cast<float>(w[c][k]);
    return;
  }
#endif
  dot_tile(x, w, n, sums);
}

constexpr int64_t kMinWorkPerThread = 65536;  // element operations (threads.h)

}  // namespace

// Per element two passes and an IEEE division (vdivps: ~10 cycles a 16-float vector on Zen 4),
// so a quarter of the other loops' work per thread already pays for a second thread: 23 tokens of
// 1536 (MiniLM's output layer, one query) 8.6-11.0 -> 6.3-6.7 us a call on the AMD EPYC.
constexpr int64_t kMinQuantizeWorkPerThread = 16384;

std::vector<float> fp32_bias(const Int8LinearParams& p) {
  std::vector<float> bias(p.bias && !p.acc ? p.n : 0);
  if (!bias.empty()) load_row(p.bias, p.dtype, bias.data(), p.n);
  return bias;
}

void quantize_per_token(const QuantizeParams& p) {
  in_team(threads_for(p.num_threads, p.rows, p.rows * p.cols, kMinQuantizeWorkPerThread), [&] {
    std::vector<float> row(p.cols);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.rows; ++i) {
      load_row(at_row(p.x, p.dtype, i, p.cols), p.dtype, row.data(), p.cols);
      p.scale[i] = quantize_row(row.data(), p.cols, p.q + i * p.cols);
    }
  });
}

void dequantize_accumulators(const Int8LinearParams& p) {
  std::vector<float> bias;
  if (p.bias) {
    bias.resize(p.n);
    load_row(p.bias, p.dtype, bias.data(), p.n);
  }
  in_team(threads_for(p.num_threads, p.m, p.m * p.n, kMinWorkPerThread), [&] {
    std::vector<float> row(p.n);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.m; ++i) {
      dequantize_row(p.acc + i * p.n, p.x_scale[i], p.w_scale, p.bias ? bias.data() : nullptr,
                     p.n, row.data());
      store_row(row.data(), p.dtype, static_cast<char*>(p.out) + i * p.n * dtype_size(p.dtype),
                p.n);
    }
  });
}

void int8_linear_w8a16(const Int8LinearParams& p) {
  // x converted to fp32 once; bias too.
  std::vector<float> x(p.m * p.k), bias(p.bias ? p.n : 0);
  for (int64_t i = 0; i < p.m; ++i)
    load_row(at_row(p.x, p.dtype, i, p.k), p.dtype, x.data() + i * p.k, p.k);
  if (p.bias) load_row(p.bias, p.dtype, bias.data(), p.n);
  std::vector<float> out(p.m * p.n);
  const int64_t blocks = (p.n + kWeightRowsPerBlock - 1) / kWeightRowsPerBlock;
  in_team(threads_for(p.num_threads, blocks, p.m * p.n * p.k, kMinWorkPerThread), [&] {
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t j_end = std::min(p.n, (block + 1) * kWeightRowsPerBlock);
      for (int64_t j0 = block * kWeightRowsPerBlock; j0 < j_end; j0 += kTileCols) {
        for (int64_t i0 = 0; i0 < p.m; i0 += kTileRows) {
          // Tiles past the last row / weight row repeat it; those sums are not stored.
          const float* x_rows[kTileRows];
          const int8_t* w_rows[kTileCols];
          for (int64_t r = 0; r < kTileRows; ++r)
            x_rows[r] = x.data() + std::min(i0 + r, p.m - 1) * p.k;
          for (int64_t c = 0; c < kTileCols; ++c)
            w_rows[c] = p.w + std::min(j0 + c, j_end - 1) * p.k;
          float sums[kTileRows * kTileCols];
          if (p.m == 1)
            dot_tile_one_row(x_rows, w_rows, p.k, sums);
          else
            dot_tile_few_rows(x_rows, w_rows, p.k, sums);
          for (int64_t r = 0; r < std::min(kTileRows, p.m - i0); ++r)
            for (int64_t c = 0; c < std::min(kTileCols, j_end - j0); ++c)
              out[(i0 + r) * p.n + j0 + c] = sums[r * kTileCols + c] * p.w_scale[j0 + c] +
                                             (p.bias ? bias[j0 + c] : 0.f);
        }
      }
    }
  });
  for (int64_t i = 0; i < p.m; ++i)
    store_row(out.data() + i * p.n, p.dtype,
              static_cast<char*>(p.out) + i * p.n * dtype_size(p.dtype), p.n);
}

TRANSFUSE_MULTIVERSION void dequantize_weight_row(const int8_t* w, float scale, int64_t k,
                                                  float* out) {
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<float>(w[i]) * scale;
}

void dequantize_weight(const int8_t* w, const float* w_scale, int64_t rows, int64_t k, float* out,
                       int num_threads) {
  in_team(threads_for(num_threads, rows, rows * k, kMinWorkPerThread), [&] {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < rows; ++j) dequantize_weight_row(w + j * k, w_scale[j], k, out + j * k);
  });
}

bool int8_gemv(const Int8LinearParams& p) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (vector_isa() == VectorIsa::baseline || p.m > kInt8GemvMaxRows) return false;
  const int64_t blocks = (p.n + kWeightRowsPerBlock - 1) / kWeightRowsPerBlock;
  in_team(threads_for(p.num_threads, blocks, p.m * p.n * p.k, kMinWorkPerThread), [&] {
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block)
      int8_gemv_rows_avx2(p.x_q, p.m, p.w, p.k, p.n, block * kWeightRowsPerBlock,
                          std::min(p.n, (block + 1) * kWeightRowsPerBlock), p.acc);
  });
  return true;
#else
  return false;
#endif
}

bool has_int8_dot() {
#ifdef TRANSFUSE_X86_MULTIVERSION
  // as vector_isa() sees it: TRANSFUSE_CPU_ISA=avx2 on an AVX512-VNNI CPU tests the paths of one
  // without VNNI
  static const bool has =
      (vector_isa() == VectorIsa::avx512 && __builtin_cpu_supports("avx512vnni")) ||
      (vector_isa() != VectorIsa::baseline && __builtin_cpu_supports("avxvnni"));
  return has;
#else
  return true;
#endif
}

}  // namespace transfuse::cpu
