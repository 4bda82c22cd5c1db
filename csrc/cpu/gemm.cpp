// The CPU fp32 GEMM with its epilogue, on AVX-512 and on AVX2 with FMA (the math is in
// common/gemm.h). It runs w8a16 for more rows than the GEMV takes, its weight panels dequantized
// (int8 -> fp32, exact) as they are packed, so the weights are never widened in memory, and
// transfuse's fp32 linear.
// Blocking: each thread takes panels of 64 weight rows; for each block of kDepth columns of k it
// packs the panel's block (16 rows x 16 k at a time: widened, then a 16 x 16 transpose) into a
// buffer that stays in L2 and runs every 6-row tile of x over it: 24 fp32 accumulators (6 rows x
// 64 columns), per column of k 4 vector loads of the panel, 6 broadcasts of x and 24 FMAs. Sums
// over several k blocks wait in fp32 between blocks; the last block's epilogue takes the tile from
// registers. fp32 weights' panels may also come packed before (p.w_packed, as pack_weight_fp32
// lays them out). AVX2 packs the panels as 4 strips of 16 columns, each contiguous (8 x 8
// transposes), and runs 6 x 16 tiles of 12 accumulators over each, its epilogue a tile at a time
// (epilogue_avx2.h); an int8 weight's strips may come packed before as int8
// (pack_weight_int8_strips), widened as the tiles load them. Its threads take (panel, block of
// kBlockRowsAvx2 rows) pairs, so that many rows of x spread over as many threads as there are
// pairs: at 96 rows it ran 1.1-1.6x torch's F.linear (oneDNN / MKL) on all-MiniLM-L6-v2's and
// opus-mt-en-de's shapes, at 128-256 rows 0.98-1.4x, at 512-1024 rows 0.98-1.12x (AMD EPYC,
// Zen 3, 2 threads; one thread 1.0-1.1x).
#include <algorithm>

#include "activation.h"
#include "buffer.h"
#include "convert.h"
#include "gemm.h"
#include "multiversion.h"
#include "threads.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include "epilogue_avx2.h"
#include "epilogue_avx512.h"
#include "transpose_avx512.h"
#endif

namespace transfuse::cpu {

#ifdef TRANSFUSE_X86_MULTIVERSION
namespace {

constexpr int64_t kTileRows = 6;
constexpr int64_t kPanelVectors = 4;
constexpr int64_t kPanelCols = 16 * kPanelVectors;
constexpr int64_t kDepth = 1536;  // k columns per block: a 384 KB panel block, in L2 (1 MB+)
constexpr int64_t kMinWorkPerThread = 1 << 18;  // multiply-adds (threads.h)

// Row j's 16 weights from column k0 as fp32 (int8 widened exactly), zeros past `len`.
TRANSFUSE_AVX512BW inline __m512 load_weights(const int8_t* row, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row)));
}
TRANSFUSE_AVX512BW inline __m512 load_weights(const float* row, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, row);
}

// panel[kk * 64 + 16 c + l] = float(w[j0 + 16 c + l, k0 + kk]) for kk < depth (zeros past n).
template <typename Weight>
TRANSFUSE_AVX512BW void pack_panel(const Weight* w, int64_t n, int64_t k, int64_t j0, int64_t k0,
                                   int64_t depth, float* panel) {
  for (int64_t c = 0; c < kPanelVectors; ++c)
    for (int64_t kk = 0; kk < depth; kk += 16) {
      const int64_t len = std::min<int64_t>(16, depth - kk);
      const __mmask16 mask = __mmask16((1u << len) - 1);
      __m512i rows[16], columns[16];
      for (int64_t l = 0; l < 16; ++l) {
        const int64_t j = j0 + 16 * c + l;
        rows[l] = j < n ? _mm512_castps_si512(load_weights(w + j * k + k0 + kk, mask))
                        : _mm512_setzero_si512();
      }
      transpose16(rows, columns);
      for (int64_t q = 0; q < len; ++q)
        _mm512_storeu_si512(panel + (kk + q) * kPanelCols + 16 * c, columns[q]);
    }
}

// What a tile's store needs of the call and the panel.
struct TileTarget {
  const GemmParams* p;
  int64_t j0;                      // the panel's first column
  __mmask16 store[kPanelVectors];  // columns of each vector inside n
  __m512 w_scale[kPanelVectors], bias[kPanelVectors];
  float* partial;                  // [m, n] fp32 sums between k blocks (several blocks only)
};

#define TRANSFUSE_W8A16_ROW_DECLARE(r) \
  __m512 acc##r##0, acc##r##1, acc##r##2, acc##r##3;
#define TRANSFUSE_W8A16_ROW_START(r)                                                        \
  if constexpr (R > r) {                                                                    \
    acc##r##0 = acc##r##1 = acc##r##2 = acc##r##3 = zero;                                   \
    if (!first) {                                                                           \
      const float* from = t.partial + (i0 + r) * p.n + t.j0;                                \
      acc##r##0 = _mm512_maskz_loadu_ps(t.store[0], from);                                  \
      acc##r##1 = _mm512_maskz_loadu_ps(t.store[1], from + 16);                             \
      acc##r##2 = _mm512_maskz_loadu_ps(t.store[2], from + 32);                             \
      acc##r##3 = _mm512_maskz_loadu_ps(t.store[3], from + 48);                             \
    }                                                                                       \
  }
#define TRANSFUSE_W8A16_ROW_STEP(r)                                                         \
  if constexpr (R > r) {                                                                    \
    const __m512 xv = _mm512_set1_ps(x[r * p.k + kk]);                                      \
    acc##r##0 = _mm512_fmadd_ps(xv, w0, acc##r##0);                                         \
    acc##r##1 = _mm512_fmadd_ps(xv, w1, acc##r##1);                                         \
    acc##r##2 = _mm512_fmadd_ps(xv, w2, acc##r##2);                                         \
    acc##r##3 = _mm512_fmadd_ps(xv, w3, acc##r##3);                                         \
  }
#define TRANSFUSE_W8A16_ROW_SAVE(r)                                                         \
  if constexpr (R > r) {                                                                    \
    sums[r][0] = acc##r##0;                                                                 \
    sums[r][1] = acc##r##1;                                                                 \
    sums[r][2] = acc##r##2;                                                                 \
    sums[r][3] = acc##r##3;                                                                 \
  }

// sums[r][c] = the partial sums of rows i0 + r (R <= 6) over k columns [k0, k0 + depth), added to
// those of the blocks before (from t.partial unless `first`). x points at x[i0, k0].
template <int R>
TRANSFUSE_AVX512BW __attribute__((noinline)) void tile_product(
    const float* x, const float* panel, int64_t depth, bool first, const TileTarget& t,
    int64_t i0, __m512 sums[kTileRows][kPanelVectors]) {
  static_assert(kTileRows == 6 && kPanelVectors == 4, "the macros name 6 rows of 4 vectors");
  const GemmParams& p = *t.p;
  const __m512 zero = _mm512_setzero_ps();
  TRANSFUSE_W8A16_ROW_DECLARE(0) TRANSFUSE_W8A16_ROW_DECLARE(1) TRANSFUSE_W8A16_ROW_DECLARE(2)
  TRANSFUSE_W8A16_ROW_DECLARE(3) TRANSFUSE_W8A16_ROW_DECLARE(4) TRANSFUSE_W8A16_ROW_DECLARE(5)
  TRANSFUSE_W8A16_ROW_START(0) TRANSFUSE_W8A16_ROW_START(1) TRANSFUSE_W8A16_ROW_START(2)
  TRANSFUSE_W8A16_ROW_START(3) TRANSFUSE_W8A16_ROW_START(4) TRANSFUSE_W8A16_ROW_START(5)
  for (int64_t kk = 0; kk < depth; ++kk) {
    const float* vectors = panel + kk * kPanelCols;
    const __m512 w0 = _mm512_loadu_ps(vectors), w1 = _mm512_loadu_ps(vectors + 16),
                 w2 = _mm512_loadu_ps(vectors + 32), w3 = _mm512_loadu_ps(vectors + 48);
    TRANSFUSE_W8A16_ROW_STEP(0) TRANSFUSE_W8A16_ROW_STEP(1) TRANSFUSE_W8A16_ROW_STEP(2)
    TRANSFUSE_W8A16_ROW_STEP(3) TRANSFUSE_W8A16_ROW_STEP(4) TRANSFUSE_W8A16_ROW_STEP(5)
  }
  TRANSFUSE_W8A16_ROW_SAVE(0) TRANSFUSE_W8A16_ROW_SAVE(1) TRANSFUSE_W8A16_ROW_SAVE(2)
  TRANSFUSE_W8A16_ROW_SAVE(3) TRANSFUSE_W8A16_ROW_SAVE(4) TRANSFUSE_W8A16_ROW_SAVE(5)
}

// A tile's sums after a k block: kept in t.partial, or (`last`) out = sums * s_x * s_w + bias in
// p.dtype.
TRANSFUSE_AVX512BW void tile_store(const __m512 sums[kTileRows][kPanelVectors], int64_t rows,
                                   bool last, const TileTarget& t, int64_t i0) {
  const GemmParams& p = *t.p;
  if (!last) {
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < kPanelVectors; ++c)
        _mm512_mask_storeu_ps(t.partial + (i0 + r) * p.n + t.j0 + 16 * c, t.store[c], sums[r][c]);
    return;
  }
  __m512 scaled[kTileRows][kPanelVectors];  // by x_scale, where given
  for (int64_t r = 0; r < rows && p.x_scale; ++r)
    for (int c = 0; c < kPanelVectors; ++c)
      scaled[r][c] = _mm512_mul_ps(sums[r][c], _mm512_set1_ps(p.x_scale[i0 + r]));
  store_tile<kTileRows>(p.x_scale ? scaled : sums, rows, t.w_scale, t.bias, t.store, p.gelu,
                        p.approximate, p.dtype,
                        static_cast<char*>(p.out) + (i0 * p.n + t.j0) * dtype_size(p.dtype), p.n);
}

TRANSFUSE_AVX512BW void run_tile(int64_t rows, const float* x, const float* panel, int64_t depth,
                                 bool first, bool last, const TileTarget& t, int64_t i0) {
  __m512 sums[kTileRows][kPanelVectors];
  switch (rows) {
    case 1: tile_product<1>(x, panel, depth, first, t, i0, sums); break;
    case 2: tile_product<2>(x, panel, depth, first, t, i0, sums); break;
    case 3: tile_product<3>(x, panel, depth, first, t, i0, sums); break;
    case 4: tile_product<4>(x, panel, depth, first, t, i0, sums); break;
    case 5: tile_product<5>(x, panel, depth, first, t, i0, sums); break;
    default: tile_product<6>(x, panel, depth, first, t, i0, sums); break;
  }
  tile_store(sums, rows, last, t, i0);
}

TRANSFUSE_AVX512BW void gemm_avx512(const GemmParams& p) {
  const auto partial = uninitialized<float>(p.k > kDepth ? p.m * p.n : 0);
  const int64_t panels = (p.n + kPanelCols - 1) / kPanelCols;
  const auto* packed = p.w_int8 ? nullptr : static_cast<const float*>(p.w_packed);
  in_team(threads_for(p.num_threads, panels, p.m * p.n * p.k, kMinWorkPerThread),
          [&]() TRANSFUSE_AVX512BW {
    const auto panel = uninitialized<float>(packed ? 0 : kDepth * kPanelCols);
#pragma omp for schedule(static)
    for (int64_t panel_index = 0; panel_index < panels; ++panel_index) {
      TileTarget t;
      t.p = &p;
      t.j0 = panel_index * kPanelCols;
      t.partial = partial.get();
      for (int64_t c = 0; c < kPanelVectors; ++c) {
        const int64_t col = t.j0 + 16 * c, inside = std::clamp<int64_t>(p.n - col, 0, 16);
        t.store[c] = __mmask16((1u << inside) - 1);
        t.w_scale[c] = p.w_scale ? _mm512_maskz_loadu_ps(t.store[c], p.w_scale + col)
                                 : _mm512_set1_ps(1.f);
        t.bias[c] = p.bias ? _mm512_maskz_loadu_ps(t.store[c], p.bias + col) : _mm512_setzero_ps();
      }
      for (int64_t k0 = 0; k0 < p.k; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, p.k - k0);
        const float* block = panel.get();
        if (packed)
          block = packed + (panel_index * p.k + k0) * kPanelCols;
        else if (p.w_int8)
          pack_panel(static_cast<const int8_t*>(p.w), p.n, p.k, t.j0, k0, depth,
                     panel.get());
        else
          pack_panel(static_cast<const float*>(p.w), p.n, p.k, t.j0, k0, depth, panel.get());
        for (int64_t i0 = 0; i0 < p.m; i0 += kTileRows)
          run_tile(std::min(kTileRows, p.m - i0), static_cast<const float*>(p.x) + i0 * p.k + k0,
                   block, depth, k0 == 0, k0 + depth == p.k, t, i0);
      }
    }
  });
}

// ---- AVX2 with FMA: panels of 64 weight rows as kStrips strips of 16, run by tiles of up to 6
// rows x 16 columns: 12 accumulators, per column of k 2 vector loads of the strip, 6 broadcasts
// of x and 12 FMAs (AVX2 has 16 vector registers).
constexpr int64_t kStripCols = 16;
constexpr int64_t kStrips = kPanelCols / kStripCols;
constexpr int64_t kBlockRowsAvx2 = 96;  // rows of x per task: 16 tiles, in L2 over a block of k

// 8 weights of a row from `from` as fp32 (int8 widened exactly).
TRANSFUSE_AVX2_FMA inline __m256 load_weights8(const float* from) { return _mm256_loadu_ps(from); }
TRANSFUSE_AVX2_FMA inline __m256 load_weights8(const int8_t* from) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(from));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

// rows[q][l] becomes rows[l][q] (8 x 8 floats).
TRANSFUSE_AVX2_FMA inline void transpose8(__m256 rows[8]) {
  __m256 pairs[8], quads[8];
  for (int q = 0; q < 8; q += 2) {
    pairs[q] = _mm256_unpacklo_ps(rows[q], rows[q + 1]);      // r0[0] r1[0] r0[1] r1[1] | [4] [5]
    pairs[q + 1] = _mm256_unpackhi_ps(rows[q], rows[q + 1]);  // r0[2] r1[2] r0[3] r1[3] | [6] [7]
  }
  for (int h = 0; h < 8; h += 4) {  // columns 0..3 of rows h..h+3 | columns 4..7
    quads[h] = _mm256_shuffle_ps(pairs[h], pairs[h + 2], 0x44);
    quads[h + 1] = _mm256_shuffle_ps(pairs[h], pairs[h + 2], 0xEE);
    quads[h + 2] = _mm256_shuffle_ps(pairs[h + 1], pairs[h + 3], 0x44);
    quads[h + 3] = _mm256_shuffle_ps(pairs[h + 1], pairs[h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    rows[c] = _mm256_permute2f128_ps(quads[c], quads[c + 4], 0x20);
    rows[c + 4] = _mm256_permute2f128_ps(quads[c], quads[c + 4], 0x31);
  }
}

// The AVX2 panels: strip by strip, each contiguous, so that a strip's pass streams it:
// panel[s * depth * 16 + kk * 16 + l] = float(w[j0 + 16 s + l, k0 + kk]) for kk < depth (zeros past
// n); through 8 x 8 transposes.
template <typename Weight>
TRANSFUSE_AVX2_FMA void pack_panel_avx2(const Weight* w, int64_t n, int64_t k, int64_t j0,
                                        int64_t k0, int64_t depth, float* panel) {
  const int64_t full = depth - depth % 8;
  for (int64_t l0 = 0; l0 < kPanelCols; l0 += 8) {
    const Weight* rows[8];  // null past n
    for (int l = 0; l < 8; ++l) rows[l] = j0 + l0 + l < n ? w + (j0 + l0 + l) * k + k0 : nullptr;
    float* strip = panel + l0 / kStripCols * depth * kStripCols + l0 % kStripCols;
    for (int64_t kk = 0; kk < full; kk += 8) {
      __m256 block[8];
      for (int l = 0; l < 8; ++l)
        block[l] = rows[l] ? load_weights8(rows[l] + kk) : _mm256_setzero_ps();
      transpose8(block);
      for (int q = 0; q < 8; ++q) _mm256_storeu_ps(strip + (kk + q) * kStripCols, block[q]);
    }
    for (int64_t kk = full; kk < depth; ++kk)
      for (int l = 0; l < 8; ++l) strip[kk * kStripCols + l] = rows[l] ? float(rows[l][kk]) : 0.f;
  }
}

// An int8 weight's panel kept packed (pack_weight_int8_strips): the strips' layout of
// pack_panel_avx2 over all of k, as int8.
void pack_panel_int8_strips(const int8_t* w, int64_t n, int64_t k, int64_t j0, int8_t* panel) {
  for (int64_t s = 0; s < kStrips; ++s)
    for (int64_t l = 0; l < kStripCols; ++l) {
      const int64_t j = j0 + s * kStripCols + l;
      int8_t* to = panel + s * k * kStripCols + l;
      for (int64_t kk = 0; kk < k; ++kk) to[kk * kStripCols] = j < n ? w[j * k + kk] : 0;
    }
}

// sums[r][0..16) += sum over kk < depth of x[r * k + kk] * float(strip[kk * 16 + 0..16)), rows
// r < R (int8 strips widened as they are loaded).
template <int R, typename Weight>
TRANSFUSE_AVX2_FMA __attribute__((noinline)) void strip_product(
    const float* x, int64_t k, const Weight* strip, int64_t depth,
    float sums[kTileRows][kStripCols]) {
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm256_loadu_ps(sums[r]);
    acc[r][1] = _mm256_loadu_ps(sums[r] + 8);
  }
  for (int64_t kk = 0; kk < depth; ++kk) {
    const __m256 w0 = load_weights8(strip + kk * kStripCols),
                 w1 = load_weights8(strip + kk * kStripCols + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * k + kk);
      acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(sums[r], acc[r][0]);
    _mm256_storeu_ps(sums[r] + 8, acc[r][1]);
  }
}

template <typename Weight>
using StripProduct = void (*)(const float*, int64_t, const Weight*, int64_t,
                              float[kTileRows][kStripCols]);
template <typename Weight>
constexpr StripProduct<Weight> kStripProducts[kTileRows] = {
    strip_product<1, Weight>, strip_product<2, Weight>, strip_product<3, Weight>,
    strip_product<4, Weight>, strip_product<5, Weight>, strip_product<6, Weight>};

TRANSFUSE_AVX2_FMA void gemm_avx2(const GemmParams& p) {
  const auto partial = uninitialized<float>(p.k > kDepth ? p.m * p.n : 0);
  const int64_t panels = (p.n + kPanelCols - 1) / kPanelCols;
  const int64_t row_blocks = (p.m + kBlockRowsAvx2 - 1) / kBlockRowsAvx2;
  const auto* x = static_cast<const float*>(p.x);
  // tasks: (panel, block of rows), a thread's in a row: the blocks of one panel, then the next's
  in_team(threads_for(p.num_threads, panels * row_blocks, p.m * p.n * p.k, kMinWorkPerThread),
          [&]() TRANSFUSE_AVX2_FMA {
    const auto panel = uninitialized<float>(p.w_packed ? 0 : kDepth * kPanelCols);
    int64_t packed_panel = -1, packed_k0 = -1;  // what `panel` holds
#pragma omp for schedule(static)
    for (int64_t task = 0; task < panels * row_blocks; ++task) {
      const int64_t panel_index = task / row_blocks, j0 = panel_index * kPanelCols;
      const int64_t row_begin = task % row_blocks * kBlockRowsAvx2,
                    row_end = std::min(p.m, row_begin + kBlockRowsAvx2);
      for (int64_t k0 = 0; k0 < p.k; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, p.k - k0);
        const bool first = k0 == 0, last = k0 + depth == p.k;
        // the strips of the panel's block: packed before over all of k (fp32, or int8 widened by
        // the tiles), else packed (widened) for this block, unless the last task packed it
        const float* block = panel.get();
        const int8_t* block_int8 = nullptr;
        int64_t strip_stride = depth * kStripCols;
        const int64_t offset = panel_index * p.k * kPanelCols + k0 * kStripCols;
        if (p.w_packed) {
          strip_stride = p.k * kStripCols;
          if (p.w_int8)
            block_int8 = static_cast<const int8_t*>(p.w_packed) + offset;
          else
            block = static_cast<const float*>(p.w_packed) + offset;
        } else if (panel_index != packed_panel || k0 != packed_k0) {
          if (p.w_int8)
            pack_panel_avx2(static_cast<const int8_t*>(p.w), p.n, p.k, j0, k0, depth,
                            panel.get());
          else
            pack_panel_avx2(static_cast<const float*>(p.w), p.n, p.k, j0, k0, depth,
                            panel.get());
          packed_panel = panel_index, packed_k0 = k0;
        }
        for (int64_t strip = 0; strip < kStrips && j0 + strip * kStripCols < p.n; ++strip) {
          const int64_t col = j0 + strip * kStripCols, cols = std::min(kStripCols, p.n - col);
          for (int64_t i0 = row_begin; i0 < row_end; i0 += kTileRows) {
            const int64_t rows = std::min(kTileRows, row_end - i0);
            float sums[kTileRows][kStripCols] = {};
            for (int64_t r = 0; r < rows && !first; ++r)
              std::copy_n(partial.get() + (i0 + r) * p.n + col, cols, sums[r]);
            const float* x_tile = x + i0 * p.k + k0;
            if (block_int8)
              kStripProducts<int8_t>[rows - 1](x_tile, p.k, block_int8 + strip * strip_stride,
                                               depth, sums);
            else
              kStripProducts<float>[rows - 1](x_tile, p.k, block + strip * strip_stride, depth,
                                              sums);
            if (last)
              store_tile_avx2<kTileRows>(p, sums, rows, i0, col, cols);
            else
              for (int64_t r = 0; r < rows; ++r)
                std::copy_n(sums[r], cols, partial.get() + (i0 + r) * p.n + col);
          }
        }
      }
    }
  });
}

// All panels, each over all of k (the layout of this CPU's GEMM: gemm_avx512 reads panel P's
// block at k0 from float (P * k + k0) * 64, gemm_avx2 its strips from float P * k * 64).
void pack_all_panels(const float* w, int64_t n, int64_t k, float* packed, int num_threads) {
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  const bool avx512 = has_gemm();
  in_team(threads_for(num_threads, panels, n * k, kMinWorkPerThread), [&]() {
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel) {
      float* to = packed + panel * k * kPanelCols;
      if (avx512)
        pack_panel(w, n, k, panel * kPanelCols, 0, k, to);
      else
        pack_panel_avx2(w, n, k, panel * kPanelCols, 0, k, to);
    }
  });
}

}  // namespace
#endif

int64_t packed_weight_bytes_fp32(int64_t n, int64_t k) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  return (n + kPanelCols - 1) / kPanelCols * k * kPanelCols * int64_t(sizeof(float));
#else
  return 0;
#endif
}

bool pack_weight_fp32(const float* w, int64_t n, int64_t k, void* packed, int num_threads) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (gemm_max_rows() == 0) return false;
  pack_all_panels(w, n, k, static_cast<float*>(packed), num_threads);
  return true;
#else
  return false;
#endif
}

int64_t packed_weight_bytes_int8_strips(int64_t n, int64_t k) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (has_gemm() || gemm_max_rows() == 0) return 0;
  return packed_weight_bytes_fp32(n, k) / int64_t(sizeof(float));  // a byte a weight
#else
  return 0;
#endif
}

bool pack_weight_int8_strips(const int8_t* w, int64_t n, int64_t k, void* packed,
                             int num_threads) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (packed_weight_bytes_int8_strips(n, k) == 0) return false;
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  in_team(threads_for(num_threads, panels, n * k, kMinWorkPerThread), [&]() {
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel)
      pack_panel_int8_strips(w, n, k, panel * kPanelCols,
                             static_cast<int8_t*>(packed) + panel * k * kPanelCols);
  });
  return true;
#else
  return false;
#endif
}

bool has_gemm() {
#ifdef TRANSFUSE_X86_MULTIVERSION
  return has_avx512bw_vl();
#else
  return false;
#endif
}

int64_t gemm_max_rows() {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (has_gemv()) return INT64_MAX;  // AVX-512 (has_gemm), or AVX2 with FMA
#endif
  return 0;
}

bool gemm(const GemmParams& p) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (has_gemm())
    gemm_avx512(p);
  else if (has_gemv())  // AVX2 with FMA
    gemm_avx2(p);
  else
    return false;
  return true;
#else
  return false;
#endif
}

}  // namespace transfuse::cpu
