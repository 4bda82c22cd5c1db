// The CPU int8 x int8 GEMM with its dequantizing epilogue, for AVX512-VNNI (vpdpbusd: 64 byte
// products a cycle into 16 int32 sums) and AMX-INT8. The math is in common/int8.h.
//
// acc[i, j] = sum_k x_q[i, k] * w[j, k]. vpdpbusd multiplies unsigned by signed bytes, so x goes in
// as u = x_q + 128 (x_q ^ 0x80, for every x_q in [-128, 127]) and
//   acc[i, j] = sum_k u[i, k] * w[j, k] - 128 * sum_k w[j, k],
// in int32 modulo 2^32: the intermediate sums may wrap, the result (|acc| < 2^31 for k <= kMaxK) is
// exact. Blocking: each thread takes panels of 64 weight rows, packs one (16 rows x 4 bytes of k
// per 64-byte vector: a 16 x 16 transpose of int32) into a buffer that stays in L2 (or reads it
// packed before: p.w_packed, all panels as pack_weight_vnni lays them out), and runs every
// 6-row tile of x over it: 24 accumulators (6 rows x 64 columns), per 4 columns of k 4 vector loads
// of the panel and 6 broadcasts of 4 bytes of x. The epilogue takes the tile from registers. Few
// rows of x (runs_gemv) instead read the weights as stored (gemv_rows): no packing.
// On a CPU with AMX (amx.h), more rows than that run on the tiles instead, the weights read as
// stored too: tdpbssd (signed x signed bytes, no offset) into int32 tiles of 16 weight rows x 16
// tokens, 64 of k per instruction (amx_block), transposed for the same epilogue.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "buffer.h"
#include "convert.h"
#include "int8.h"
#include "multiversion.h"
#include "threads.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include "amx.h"
#include "epilogue_avx512.h"
#include "transpose_avx512.h"
#endif

namespace transfuse::cpu {

#ifdef TRANSFUSE_X86_MULTIVERSION
namespace {

#define TRANSFUSE_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

constexpr int64_t kTileRows = 6;     // rows of x per tile
constexpr int64_t kPanelVectors = 4;  // 16-column vectors per panel
constexpr int64_t kPanelCols = 16 * kPanelVectors;
static_assert(kPanelCols == kAmxPanelRows, "AMX panels share the epilogue");
constexpr int64_t kGroupBytes = 4 * kPanelCols;  // one group of 4 k columns of a packed panel
constexpr int64_t kMinWorkPerThread = 1 << 20;    // multiply-adds (threads.h)
constexpr int64_t kAmxGemvTokens = 4;  // with AMX, more rows of x than this: the tiles
constexpr int64_t kGemvRowsPerBlock = 16;         // gemv_rows: weight rows a thread takes at a time
constexpr int64_t kMinGemvWorkPerThread = 65536;  // gemv_rows: multiply-adds (threads.h)

// Packs weight rows [j0, j0 + 64) (zeros past n; k zero-padded to groups * 4) as
// panel[g][c][l][b] = w[j0 + 16 c + l][4 g + b], and returns 128 * sum_k w[j] per column vector.
TRANSFUSE_VNNI void pack_panel(const int8_t* w, int64_t n, int64_t k, int64_t j0, int8_t* panel,
                               __m512i offset[kPanelVectors]) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t c = 0; c < kPanelVectors; ++c) {
    __m512i sums = _mm512_setzero_si512();
    for (int64_t k0 = 0; k0 < k; k0 += 64) {
      const __mmask64 mask = k - k0 >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k - k0)) - 1;
      __m512i rows[16], columns[16];
      for (int64_t l = 0; l < 16; ++l) {
        const int64_t j = j0 + 16 * c + l;
        rows[l] = j < n ? _mm512_maskz_loadu_epi8(mask, w + j * k + k0) : _mm512_setzero_si512();
      }
      transpose16(rows, columns);
      const int64_t groups = std::min<int64_t>(16, (k - k0 + 3) / 4);
      for (int64_t g = 0; g < groups; ++g) {
        _mm512_storeu_si512(panel + (k0 / 4 + g) * kGroupBytes + c * 64, columns[g]);
        sums = _mm512_dpbusd_epi32(sums, ones, columns[g]);
      }
    }
    offset[c] = _mm512_slli_epi32(sums, 7);
  }
}

// u[i, k] = x_q[i, k] + 128 (as x_q ^ 0x80), each row padded with 128 (x_q = 0) to `stride`.
TRANSFUSE_VNNI void offset_rows(const int8_t* x_q, int64_t m, int64_t k, int64_t stride,
                                uint8_t* u) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t k0 = 0; k0 < stride; k0 += 64) {
      const int64_t in_x = std::max<int64_t>(k - k0, 0), in_row = stride - k0;
      const __mmask64 inside = in_x >= 64 ? ~__mmask64(0) : (__mmask64(1) << in_x) - 1;
      const __mmask64 row = in_row >= 64 ? ~__mmask64(0) : (__mmask64(1) << in_row) - 1;
      const __m512i v = _mm512_maskz_loadu_epi8(inside, x_q + i * k + k0);
      _mm512_mask_storeu_epi8(u + i * stride + k0, row, _mm512_xor_si512(v, flip));
    }
}

// What the epilogue needs of a call and a panel.
struct Epilogue {
  const Int8LinearParams* p;
  int64_t j0;                        // the panel's first column
  __mmask16 store[kPanelVectors];    // columns of each vector inside n
  __m512 w_scale[kPanelVectors], bias[kPanelVectors];
};

// acc + the dot products of the four u8 of a with the four s8 of b in each int32 lane
// (vpdpbusd). As inline assembly: with the intrinsic GCC 12 copies each accumulator to another
// register and to the stack at every step of the loop below.
TRANSFUSE_VNNI inline __m512i dot_add(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// Row r of a tile: its 4 accumulators, and one step of 4 k columns.
#define TRANSFUSE_TILE_ROW_DECLARE(r) \
  __m512i acc##r##0 = zero, acc##r##1 = zero, acc##r##2 = zero, acc##r##3 = zero;
#define TRANSFUSE_TILE_ROW_STEP(r)                                               \
  if constexpr (R > r) {                                                         \
    int32_t four;                                                                \
    std::memcpy(&four, u + r * stride + g * 4, sizeof(four));                    \
    const __m512i xv = _mm512_set1_epi32(four);                                  \
    acc##r##0 = dot_add(acc##r##0, xv, w0);                                        \
    acc##r##1 = dot_add(acc##r##1, xv, w1);                                        \
    acc##r##2 = dot_add(acc##r##2, xv, w2);                                        \
    acc##r##3 = dot_add(acc##r##3, xv, w3);                                        \
  }
#define TRANSFUSE_TILE_ROW_SAVE(r)                                               \
  if constexpr (R > r) {                                                         \
    sums[r][0] = _mm512_sub_epi32(acc##r##0, offset[0]);                         \
    sums[r][1] = _mm512_sub_epi32(acc##r##1, offset[1]);                         \
    sums[r][2] = _mm512_sub_epi32(acc##r##2, offset[2]);                         \
    sums[r][3] = _mm512_sub_epi32(acc##r##3, offset[3]);                         \
  }

// The product of R <= 6 rows of u over one packed panel: sums[r][c] = acc[i0 + r, j0 + 16 c + l].
template <int R>
TRANSFUSE_VNNI __attribute__((noinline)) void tile_product(
    const uint8_t* u, int64_t groups, const int8_t* panel, const __m512i offset[kPanelVectors],
    __m512i sums[kTileRows][kPanelVectors]) {
  static_assert(kTileRows == 6 && kPanelVectors == 4, "the macros name 6 rows of 4 vectors");
  const __m512i zero = _mm512_setzero_si512();
  TRANSFUSE_TILE_ROW_DECLARE(0) TRANSFUSE_TILE_ROW_DECLARE(1) TRANSFUSE_TILE_ROW_DECLARE(2)
  TRANSFUSE_TILE_ROW_DECLARE(3) TRANSFUSE_TILE_ROW_DECLARE(4) TRANSFUSE_TILE_ROW_DECLARE(5)
  const int64_t stride = groups * 4;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* vectors = panel + g * kGroupBytes;
    const __m512i w0 = _mm512_loadu_si512(vectors), w1 = _mm512_loadu_si512(vectors + 64),
                  w2 = _mm512_loadu_si512(vectors + 128), w3 = _mm512_loadu_si512(vectors + 192);
    TRANSFUSE_TILE_ROW_STEP(0) TRANSFUSE_TILE_ROW_STEP(1) TRANSFUSE_TILE_ROW_STEP(2)
    TRANSFUSE_TILE_ROW_STEP(3) TRANSFUSE_TILE_ROW_STEP(4) TRANSFUSE_TILE_ROW_STEP(5)
  }
  TRANSFUSE_TILE_ROW_SAVE(0) TRANSFUSE_TILE_ROW_SAVE(1) TRANSFUSE_TILE_ROW_SAVE(2)
  TRANSFUSE_TILE_ROW_SAVE(3) TRANSFUSE_TILE_ROW_SAVE(4) TRANSFUSE_TILE_ROW_SAVE(5)
}

// One row's epilogue: raw int32 sums into p.acc, or out = float(acc) * s_x * s_w + bias in p.dtype.
TRANSFUSE_VNNI void row_epilogue(const __m512i sums[kPanelVectors], const Epilogue& e, int64_t i) {
  const Int8LinearParams& p = *e.p;
  if (p.acc) {
    for (int c = 0; c < kPanelVectors; ++c)
      _mm512_mask_storeu_epi32(p.acc + i * p.n + e.j0 + 16 * c, e.store[c], sums[c]);
    return;
  }
  const __m512 row_scale = _mm512_set1_ps(p.x_scale[i]);
  __m512 values[kPanelVectors];
  for (int c = 0; c < kPanelVectors; ++c) {
    const __m512 sum = _mm512_cvtepi32_ps(sums[c]);
    values[c] =
        _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(sum, row_scale), e.w_scale[c]), e.bias[c]);
  }
  store_vectors<kPanelVectors>(values, e.store, p.dtype,
                static_cast<char*>(p.out) + (i * p.n + e.j0) * dtype_size(p.dtype));
}

TRANSFUSE_VNNI Epilogue panel_epilogue(const Int8LinearParams& p, int64_t j0,
                                       const std::vector<float>& bias) {
  Epilogue e;
  e.p = &p;
  e.j0 = j0;
  for (int64_t c = 0; c < kPanelVectors; ++c) {
    const int64_t col = j0 + 16 * c, inside = std::clamp<int64_t>(p.n - col, 0, 16);
    e.store[c] = __mmask16((1u << inside) - 1);
    e.w_scale[c] =
        p.acc ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(e.store[c], p.w_scale + col);
    e.bias[c] =
        bias.empty() ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(e.store[c], bias.data() + col);
  }
  return e;
}

TRANSFUSE_VNNI void run_tile(int64_t rows, const uint8_t* u, int64_t groups, const int8_t* panel,
                             const __m512i offset[kPanelVectors], const Epilogue& e, int64_t i0) {
  __m512i sums[kTileRows][kPanelVectors];
  switch (rows) {
    case 1: tile_product<1>(u, groups, panel, offset, sums); break;
    case 2: tile_product<2>(u, groups, panel, offset, sums); break;
    case 3: tile_product<3>(u, groups, panel, offset, sums); break;
    case 4: tile_product<4>(u, groups, panel, offset, sums); break;
    case 5: tile_product<5>(u, groups, panel, offset, sums); break;
    default: tile_product<6>(u, groups, panel, offset, sums); break;
  }
  for (int64_t r = 0; r < rows; ++r) row_epilogue(sums[r], e, i0 + r);
}

// sums_t[r][t] = acc[t0 + t, j0 + r] for a panel of 64 weight rows (w_rows, stride bytes apart)
// and 32 tokens of xt (from t0; m_pad apart), on AMX (the calling thread's tiles configured). Per
// half panel a 2 x 2 grid of int32 tiles (0-3: 16 weight rows x 16 tokens); per 64 columns of k,
// two tiles of weight rows (4, 5: 16 x 64 bytes), two of tokens (6, 7: 16 words of 4 bytes x 16
// tokens) and four tdpbssd.
TRANSFUSE_AMX void amx_block(const int8_t* w_rows, int64_t stride, const uint32_t* xt,
                             int64_t m_pad, int64_t k_pad,
                             int32_t sums_t[kAmxPanelRows][kAmxTokens]) {
  constexpr int64_t kSumsStride = kAmxTokens * sizeof(int32_t);
  for (int64_t half = 0; half < 2; ++half) {
    const int8_t* rows = w_rows + 32 * half * stride;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < k_pad; k0 += 64) {
      const uint32_t* words = xt + k0 / 4 * m_pad;
      _tile_loadd(4, rows + k0, stride);
      _tile_loadd(5, rows + 16 * stride + k0, stride);
      _tile_loadd(6, words, m_pad * 4);
      _tile_loadd(7, words + 16, m_pad * 4);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
    _tile_stored(0, &sums_t[32 * half][0], kSumsStride);
    _tile_stored(1, &sums_t[32 * half][16], kSumsStride);
    _tile_stored(2, &sums_t[32 * half + 16][0], kSumsStride);
    _tile_stored(3, &sums_t[32 * half + 16][16], kSumsStride);
  }
}

// More than kAmxGemvTokens rows on AMX: per group of tokens whose packed x stays in L2 (1 MiB),
// each thread takes panels of 64 weight rows and runs every block of 32 tokens of the group over
// it.
TRANSFUSE_VNNI void int8_linear_amx(const Int8LinearParams& p) {
  const int64_t k_pad = (p.k + 63) / 64 * 64;
  const int64_t m_pad = (p.m + kAmxTokens - 1) / kAmxTokens * kAmxTokens;
  const std::unique_ptr<uint32_t[]> xt(new uint32_t[k_pad / 4 * m_pad]);  // pack_words fills it
  pack_words(p.x_q, p.m, p.k, k_pad / 4, m_pad, xt.get());
  const int64_t group_tokens = std::max<int64_t>(1, (1 << 20) / k_pad / kAmxTokens) * kAmxTokens;
  const std::vector<float> bias = fp32_bias(p);
  const int64_t panels = (p.n + kPanelCols - 1) / kPanelCols;
  in_team(threads_for(p.num_threads, panels, p.m * p.n * p.k, kMinWorkPerThread),
          [&]() TRANSFUSE_VNNI {
    const TileScope tile_scope;
    std::vector<uint8_t> copy;
    for (int64_t g0 = 0; g0 < p.m; g0 += group_tokens)
#pragma omp for schedule(static)
    for (int64_t panel_index = 0; panel_index < panels; ++panel_index) {
      const Epilogue e = panel_epilogue(p, panel_index * kPanelCols, bias);
      int64_t stride;
      const auto* w_rows =
          reinterpret_cast<const int8_t*>(weight_panel(p.w, p.n, p.k, e.j0, copy, &stride));
      for (int64_t t0 = g0; t0 < std::min(p.m, g0 + group_tokens); t0 += kAmxTokens) {
        alignas(64) int32_t sums_t[kAmxPanelRows][kAmxTokens];
        alignas(64) int32_t sums[kAmxTokens][kAmxPanelRows];
        amx_block(w_rows, stride, xt.get() + t0, m_pad, k_pad, sums_t);
        transpose_block(reinterpret_cast<uint32_t(*)[kAmxTokens]>(sums_t),
                        reinterpret_cast<uint32_t(*)[kAmxPanelRows]>(sums));
        for (int64_t t = 0; t < std::min(kAmxTokens, p.m - t0); ++t) {
          __m512i row[kPanelVectors];
          for (int c = 0; c < kPanelVectors; ++c) row[c] = _mm512_load_si512(&sums[t][16 * c]);
          row_epilogue(row, e, t0 + t);
        }
      }
    }
  });
}

// acc[t, c] (n apart) = sum_k u[t, k] * w_row_c[k] - 128 * sum_k w_row_c[k] for T <= 4 tokens
// of u and 4 weight rows (the first `rows` stored), from the weights' own layout: 64 columns of k
// at a time, the 4 rows sharing each vector of u. The first token group of the rows (kFirst) also
// sums each row's weights (into offset[c]) and prefetches the rows that follow into L2; later
// groups find the rows in L1 and take the offsets.
template <int T, bool kFirst>
TRANSFUSE_VNNI void dot_four_rows(const uint8_t* u, int64_t stride, const int8_t* const row[4],
                                  int64_t k, int64_t prefetch_ahead, uint32_t offset[4],
                                  int64_t rows, int32_t* acc, int64_t n) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sums[T][4], weight_sums[4];
  for (int c = 0; c < 4; ++c) {
    weight_sums[c] = _mm512_setzero_si512();
    for (int t = 0; t < T; ++t) sums[t][c] = _mm512_setzero_si512();
  }
  for (int64_t k0 = 0; k0 < k; k0 += 64) {
    const __mmask64 inside = k - k0 >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k - k0)) - 1;
    __m512i uv[T];
    for (int t = 0; t < T; ++t) uv[t] = _mm512_maskz_loadu_epi8(inside, u + t * stride + k0);
    for (int c = 0; c < 4; ++c) {
      const __m512i wv = _mm512_maskz_loadu_epi8(inside, row[c] + k0);
      if constexpr (kFirst) {
        _mm_prefetch(reinterpret_cast<const char*>(row[c] + k0 + prefetch_ahead), _MM_HINT_T1);
        weight_sums[c] = dot_add(weight_sums[c], ones, wv);
      }
      for (int t = 0; t < T; ++t) sums[t][c] = dot_add(sums[t][c], uv[t], wv);
    }
  }
  // Reduced with constant indices, the loops unrolled by pragma: otherwise GCC 12 keeps every
  // accumulator in memory, stored at each step of the loop above (2x slower).
  if constexpr (kFirst)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) offset[c] = uint32_t(_mm512_reduce_add_epi32(weight_sums[c])) << 7;
  int32_t totals[T][4];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
      totals[t][c] = int32_t(uint32_t(_mm512_reduce_add_epi32(sums[t][c])) - offset[c]);
  for (int t = 0; t < T; ++t)
    for (int64_t c = 0; c < rows; ++c) acc[t * n + c] = totals[t][c];
}

// dot_four_rows for `tokens` (1 to 4) tokens.
template <bool kFirst>
TRANSFUSE_VNNI void dot_four_rows(int64_t tokens, const uint8_t* u, int64_t stride,
                                  const int8_t* const row[4], int64_t k, int64_t ahead,
                                  uint32_t offset[4], int64_t rows, int32_t* acc, int64_t n) {
  switch (tokens) {
    case 1: return dot_four_rows<1, kFirst>(u, stride, row, k, ahead, offset, rows, acc, n);
    case 2: return dot_four_rows<2, kFirst>(u, stride, row, k, ahead, offset, rows, acc, n);
    case 3: return dot_four_rows<3, kFirst>(u, stride, row, k, ahead, offset, rows, acc, n);
    default: return dot_four_rows<4, kFirst>(u, stride, row, k, ahead, offset, rows, acc, n);
  }
}

// acc[t, j] = sum_k x_q[t, k] * w[j, k] for the m <= gemv_tokens(k) tokens of u and weight rows
// [j0, j1), the weights read as stored (a few tokens use each weight a few times: packing would
// cost more than it saves): per 4 weight rows, the tokens 4 at a time (dot_four_rows).
TRANSFUSE_VNNI void gemv_rows(const uint8_t* u, int64_t stride, int64_t m, const int8_t* w,
                              int64_t k, int64_t j0, int64_t j1, int32_t* acc, int64_t n) {
  constexpr int64_t kPrefetchRows = 16;  // as the w8a16 GEMV (int8.cpp)
  for (int64_t j = j0; j < j1; j += 4) {
    const int64_t rows = std::min<int64_t>(4, j1 - j);
    const int8_t* row[4];  // past j1: the last row again, its sums not stored
    for (int64_t c = 0; c < 4; ++c) row[c] = w + std::min(j + c, j1 - 1) * k;
    uint32_t offset[4];  // from the first group of tokens, for the others
    dot_four_rows<true>(std::min<int64_t>(m, 4), u, stride, row, k, kPrefetchRows * k, offset,
                        rows, acc + j, n);
    for (int64_t t0 = 4; t0 < m; t0 += 4)
      dot_four_rows<false>(std::min<int64_t>(m - t0, 4), u + t0 * stride, stride, row, k, 0,
                           offset, rows, acc + t0 * n + j, n);
  }
}

// Rows of x up to which gemv_rows runs instead of panels packed for the call. Packing costs a pass
// over the weights per call; gemv_rows, 16 horizontal sums per 4 weight rows x 4 tokens whatever
// k: it pays for more tokens the longer k is. Measured on the AMD EPYC (2 threads; gemv_rows over
// the panels): k = n = 4096, 1.6x at 5 tokens, 1.5x at 8, 1.2x at 16, 0.96x at 32; n = 1536,
// k = 1024: 1.3x at 5, 1.2x at 8, 0.9x at 16; k = 576: 0.96x at 8, 0.8x at 12-16.
int64_t gemv_tokens(int64_t k) { return std::clamp<int64_t>(k / 128, 4, 16); }

// With panels packed before (p.w_packed, no pass per call), gemv_rows only for one token. Measured
// on the AMD EPYC (2 threads, weights in L3; panels over gemv_rows): 2 to 16 tokens 1.15x-2.4x
// at k x n = 4096 x 4096, 1024 x 1536, 576 x 1536, 1536 x 576, 384 x 1152, 384 x 384; one token
// 0.84x-1.29x (the GEMV streams the weights as well as the panels).
constexpr int64_t kPackedGemvTokens = 1;

bool runs_gemv(int64_t m, int64_t k, bool packed) {
  return m <= (packed ? kPackedGemvTokens : gemv_tokens(k));
}

// Bytes of one packed panel: whole 16-group chunks (pack_panel writes all 16 groups of its last
// chunk), then its 4 offset vectors (pack_weight_vnni's layout).
int64_t panel_bytes(int64_t k) { return ((k + 3) / 4 + 15) / 16 * 16 * kGroupBytes; }
constexpr int64_t kOffsetBytes = kPanelVectors * 64;

bool has_vnni() {
  static const bool vnni =
      vector_isa() == VectorIsa::avx512 && __builtin_cpu_supports("avx512vnni");
  return vnni;
}

TRANSFUSE_VNNI void pack_all_panels(const int8_t* w, int64_t n, int64_t k, int8_t* packed,
                                    int num_threads) {
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols, bytes = panel_bytes(k);
  in_team(threads_for(num_threads, panels, n * k, kMinWorkPerThread), [&]() TRANSFUSE_VNNI {
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel) {
      int8_t* at = packed + panel * (bytes + kOffsetBytes);
      __m512i offset[kPanelVectors];
      pack_panel(w, n, k, panel * kPanelCols, at, offset);
      for (int c = 0; c < kPanelVectors; ++c) _mm512_storeu_si512(at + bytes + 64 * c, offset[c]);
    }
  });
}

// The panel products of `count` calls on the same x (m, k, x_q and x_scale; u its offset rows):
// one team takes every panel of every call.
TRANSFUSE_VNNI void panel_products(const Int8LinearParams* ps, int64_t count, const uint8_t* u) {
  const int64_t m = ps[0].m, k = ps[0].k, groups = (k + 3) / 4, stride = groups * 4;
  const int64_t bytes = panel_bytes(k);
  std::vector<std::vector<float>> biases(count);
  std::vector<int64_t> first_panel(count + 1, 0);  // of call c, in the panels of all calls
  bool all_packed = true;
  int64_t work = 0;
  for (int64_t c = 0; c < count; ++c) {
    biases[c] = fp32_bias(ps[c]);
    first_panel[c + 1] = first_panel[c] + (ps[c].n + kPanelCols - 1) / kPanelCols;
    all_packed = all_packed && ps[c].w_packed;
    work += m * ps[c].n * k;
  }
  const int64_t panels = first_panel[count];
  in_team(threads_for(ps[0].num_threads, panels, work, kMinWorkPerThread),
          [&]() TRANSFUSE_VNNI {
    const auto own = uninitialized<int8_t>(all_packed ? 0 : bytes);  // this thread's panel
#pragma omp for schedule(static)
    for (int64_t index = 0; index < panels; ++index) {
      int64_t c = 0;
      while (index >= first_panel[c + 1]) ++c;
      const Int8LinearParams& p = ps[c];
      const int64_t panel_index = index - first_panel[c];
      const Epilogue e = panel_epilogue(p, panel_index * kPanelCols, biases[c]);
      const int8_t* panel = own.get();
      __m512i offset[kPanelVectors];
      if (p.w_packed) {
        panel = p.w_packed + panel_index * (bytes + kOffsetBytes);
        for (int v = 0; v < kPanelVectors; ++v)
          offset[v] = _mm512_loadu_si512(panel + bytes + 64 * v);
      } else {
        pack_panel(p.w, p.n, p.k, e.j0, own.get(), offset);
      }
      for (int64_t i0 = 0; i0 < m; i0 += kTileRows)
        run_tile(std::min(kTileRows, m - i0), u + i0 * stride, groups, panel, offset, e, i0);
    }
  });
}

TRANSFUSE_VNNI void int8_linear_avx512_vnni(const Int8LinearParams& p) {
  if (p.m > kAmxGemvTokens && has_amx()) {
    int8_linear_amx(p);
    return;
  }
  const int64_t groups = (p.k + 3) / 4, stride = groups * 4;
  const auto u = uninitialized<uint8_t>(p.m * stride);
  offset_rows(p.x_q, p.m, p.k, stride, u.get());
  if (runs_gemv(p.m, p.k, p.w_packed != nullptr)) {
    const auto sums = uninitialized<int32_t>(p.acc ? 0 : p.m * p.n);
    Int8LinearParams q = p;
    if (!p.acc) q.acc = sums.get();
    const int64_t blocks = (p.n + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock;
    in_team(threads_for(p.num_threads, blocks, p.m * p.n * p.k, kMinGemvWorkPerThread),
            [&]() TRANSFUSE_VNNI {
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t j0 = block * kGemvRowsPerBlock, j1 = std::min(p.n, j0 + kGemvRowsPerBlock);
        gemv_rows(u.get(), stride, p.m, p.w, p.k, j0, j1, q.acc, p.n);
      }
    });
    if (!p.acc) dequantize_accumulators(q);
    return;
  }
  panel_products(&p, 1, u.get());
}

// Several calls on one x: its offset rows once and one team for all the panels, where each call
// would run on panels; else call by call.
TRANSFUSE_VNNI void int8_linears_avx512_vnni(const Int8LinearParams* ps, int64_t count) {
  const Int8LinearParams& p = ps[0];
  bool panels = count > 1 && !(p.m > kAmxGemvTokens && has_amx());
  for (int64_t c = 0; c < count; ++c)
    panels = panels && !runs_gemv(p.m, p.k, ps[c].w_packed != nullptr);
  if (!panels) {
    for (int64_t c = 0; c < count; ++c) int8_linear_avx512_vnni(ps[c]);
    return;
  }
  const int64_t stride = (p.k + 3) / 4 * 4;
  const auto u = uninitialized<uint8_t>(p.m * stride);
  offset_rows(p.x_q, p.m, p.k, stride, u.get());
  panel_products(ps, count, u.get());
}

}  // namespace
#endif

bool int8_linear_vnni(const Int8LinearParams& p) { return int8_linears_vnni(&p, 1); }

bool int8_linears_vnni(const Int8LinearParams* ps, int64_t count) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (!has_vnni()) return false;
  int8_linears_avx512_vnni(ps, count);
  return true;
#else
  return false;
#endif
}

int64_t packed_weight_bytes(int64_t n, int64_t k) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  return (n + kPanelCols - 1) / kPanelCols * (panel_bytes(k) + kOffsetBytes);
#else
  return 0;
#endif
}

bool int8_vnni_packs(int64_t m, int64_t k) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  return has_vnni() && !runs_gemv(m, k, true) && !(m > kAmxGemvTokens && has_amx());
#else
  return false;
#endif
}

bool pack_weight_vnni(const int8_t* w, int64_t n, int64_t k, int8_t* packed, int num_threads) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (!has_vnni()) return false;
  pack_all_panels(w, n, k, packed, num_threads);
  return true;
#else
  return false;
#endif
}

}  // namespace transfuse::cpu
