// The CPU bf16 GEMM with its epilogue, for AVX512_BF16 (vdpbf16ps: 32 bf16 products into 16 fp32
// sums, a pair of consecutive k per lane). The math is in common/gemm.h; the instruction treats
// subnormal bf16 inputs as zero and flushes subnormal sums to zero.
// Blocking as the VNNI GEMM (int8_vnni.cpp), with a pair of bf16 (32 bits) where that has four
// int8: each thread takes panels of 64 weight rows, packs one (16 rows x one pair of k per 64-byte
// vector: a 16 x 16 transpose of 32-bit pairs) into a buffer that stays in L2, and runs every
// 6-row tile of x over it: 24 fp32 accumulators (6 rows x 64 columns), per pair of k 4 vector
// loads of the panel, 6 broadcasts of a pair of x and 24 vdpbf16ps. An odd k gets a zero column.
// The panels may also come packed before (p.w_packed, as pack_weight_bf16 lays them out). Int8
// weights (w8a16 of bf16 x) are widened to bf16 as they are packed (exact: at most 8 significant
// bits), their per-row scales applied in the epilogue, so they are read from memory as int8.
#include <algorithm>
#include <cstring>
#include <vector>

#include "activation.h"
#include "buffer.h"
#include "gemm.h"
#include "multiversion.h"
#include "threads.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include "epilogue_avx512.h"
#include "transpose_avx512.h"
#endif

namespace transfuse::cpu {

#ifdef TRANSFUSE_X86_MULTIVERSION
namespace {

#define TRANSFUSE_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

constexpr int64_t kTileRows = 6;
constexpr int64_t kPanelVectors = 4;
constexpr int64_t kPanelCols = 16 * kPanelVectors;
constexpr int64_t kMinWorkPerThread = 1 << 18;  // multiply-adds (threads.h)

// acc + the dot products of the two bf16 of a with the two of b in each fp32 lane (vdpbf16ps),
// as inline assembly: GCC keeps intrinsic accumulators of such instructions in memory.
TRANSFUSE_BF16 inline __m512 dot_add(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// 32 int8 as 32 bf16: int8 -> fp32 (exact) -> bf16 (vcvtne2ps2bh; exact: 8 significant bits).
TRANSFUSE_BF16 inline __m512i bf16_of_int8(__m256i bytes) {
  const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
  const __m512 high =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
  return __m512i(_mm512_cvtne2ps_pbh(high, low));
}

// Row j's 32 weights from column k0 as bf16, zeros past the mask.
TRANSFUSE_BF16 inline __m512i load_bf16(const uint16_t* row, __mmask32 mask) {
  return _mm512_maskz_loadu_epi16(mask, row);
}
TRANSFUSE_BF16 inline __m512i load_bf16(const int8_t* row, __mmask32 mask) {
  return bf16_of_int8(_mm512_castsi512_si256(_mm512_maskz_loadu_epi8(__mmask64(mask), row)));
}

// Packs weight rows [j0, j0 + 64) (zeros past n; an odd k padded with a zero column) as
// panel[g][c][l] = the pair w[j0 + 16 c + l][2 g, 2 g + 1] (32 bits) as bf16.
template <typename Weight>
TRANSFUSE_BF16 void pack_panel(const Weight* w, int64_t n, int64_t k, int64_t j0,
                               uint32_t* panel) {
  for (int64_t c = 0; c < kPanelVectors; ++c)
    for (int64_t k0 = 0; k0 < k; k0 += 32) {
      const __mmask32 mask = k - k0 >= 32 ? ~__mmask32(0) : (__mmask32(1) << (k - k0)) - 1;
      __m512i rows[16], columns[16];
      for (int64_t l = 0; l < 16; ++l) {
        const int64_t j = j0 + 16 * c + l;
        rows[l] = j < n ? load_bf16(w + j * k + k0, mask) : _mm512_setzero_si512();
      }
      transpose16(rows, columns);
      const int64_t pairs = std::min<int64_t>(16, (k - k0 + 1) / 2);
      for (int64_t g = 0; g < pairs; ++g)
        _mm512_storeu_si512(panel + (k0 / 2 + g) * kPanelCols + 16 * c, columns[g]);
    }
}

// 32-bit words of one packed panel: whole 16-pair chunks (pack_panel writes all 16 pairs of its
// last chunk).
int64_t panel_words(int64_t k) { return ((k + 1) / 2 + 15) / 16 * 16 * kPanelCols; }

// An int8 weight's panels kept packed (pack_weight_int8_pairs): the bf16 panels' layout with each
// bf16 an int8 (half the bytes), widened into a bf16 panel per call (widen_panel): a linear pass,
// where packing from the weight transposes.
TRANSFUSE_BF16 void narrow_panel(const uint32_t* panel, int64_t words, int8_t* out) {
  for (int64_t i = 0; i < 2 * words; i += 16) {  // 16 bf16: to fp32, to int32, to int8 (exact)
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
        reinterpret_cast<const uint16_t*>(panel) + i));
    const __m512 floats = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(floats)));
  }
}

TRANSFUSE_BF16 void widen_panel(const int8_t* packed, int64_t words, uint32_t* panel) {
  for (int64_t i = 0; i < 2 * words; i += 32)
    _mm512_storeu_si512(reinterpret_cast<uint16_t*>(panel) + i,
                        bf16_of_int8(_mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(packed + i))));
}

#define TRANSFUSE_BF16_ROW_DECLARE(r) \
  __m512 acc##r##0 = zero, acc##r##1 = zero, acc##r##2 = zero, acc##r##3 = zero;
#define TRANSFUSE_BF16_ROW_STEP(r)                                               \
  if constexpr (R > r) {                                                         \
    uint32_t pair;                                                               \
    std::memcpy(&pair, x + r * stride + 2 * g, sizeof(pair));                    \
    const __m512i xv = _mm512_set1_epi32(int32_t(pair));                         \
    acc##r##0 = dot_add(acc##r##0, xv, w0);                                      \
    acc##r##1 = dot_add(acc##r##1, xv, w1);                                      \
    acc##r##2 = dot_add(acc##r##2, xv, w2);                                      \
    acc##r##3 = dot_add(acc##r##3, xv, w3);                                      \
  }
#define TRANSFUSE_BF16_ROW_SAVE(r)                                               \
  if constexpr (R > r) {                                                         \
    sums[r][0] = acc##r##0;                                                      \
    sums[r][1] = acc##r##1;                                                      \
    sums[r][2] = acc##r##2;                                                      \
    sums[r][3] = acc##r##3;                                                      \
  }

// sums[r][c] = the fp32 sums of rows r < R <= 6 of x (row stride `stride` bf16, whole pairs)
// over the packed panel.
template <int R>
TRANSFUSE_BF16 __attribute__((noinline)) void tile_product(const uint16_t* x, int64_t stride,
                                                           int64_t pairs, const uint32_t* panel,
                                                           __m512 sums[kTileRows][kPanelVectors]) {
  static_assert(kTileRows == 6 && kPanelVectors == 4, "the macros name 6 rows of 4 vectors");
  const __m512 zero = _mm512_setzero_ps();
  TRANSFUSE_BF16_ROW_DECLARE(0) TRANSFUSE_BF16_ROW_DECLARE(1) TRANSFUSE_BF16_ROW_DECLARE(2)
  TRANSFUSE_BF16_ROW_DECLARE(3) TRANSFUSE_BF16_ROW_DECLARE(4) TRANSFUSE_BF16_ROW_DECLARE(5)
  for (int64_t g = 0; g < pairs; ++g) {
    const uint32_t* vectors = panel + g * kPanelCols;
    const __m512i w0 = _mm512_loadu_si512(vectors), w1 = _mm512_loadu_si512(vectors + 16),
                  w2 = _mm512_loadu_si512(vectors + 32), w3 = _mm512_loadu_si512(vectors + 48);
    TRANSFUSE_BF16_ROW_STEP(0) TRANSFUSE_BF16_ROW_STEP(1) TRANSFUSE_BF16_ROW_STEP(2)
    TRANSFUSE_BF16_ROW_STEP(3) TRANSFUSE_BF16_ROW_STEP(4) TRANSFUSE_BF16_ROW_STEP(5)
  }
  TRANSFUSE_BF16_ROW_SAVE(0) TRANSFUSE_BF16_ROW_SAVE(1) TRANSFUSE_BF16_ROW_SAVE(2)
  TRANSFUSE_BF16_ROW_SAVE(3) TRANSFUSE_BF16_ROW_SAVE(4) TRANSFUSE_BF16_ROW_SAVE(5)
}

// out rows [i0, i0 + rows), columns [j0, j0 + 64) inside n: act(sums * w_scale + bias) in p.dtype.
TRANSFUSE_BF16 void tile_store(const __m512 sums[kTileRows][kPanelVectors], int64_t rows,
                               const GemmParams& p, int64_t i0, int64_t j0) {
  const int64_t cols = std::min(kPanelCols, p.n - j0);
  __m512 w_scale[kPanelVectors], bias[kPanelVectors];
  __mmask16 inside[kPanelVectors];
  for (int64_t c = 0; c < kPanelVectors; ++c) {
    inside[c] = __mmask16((1u << std::clamp<int64_t>(cols - 16 * c, 0, 16)) - 1);
    w_scale[c] = p.w_scale ? _mm512_maskz_loadu_ps(inside[c], p.w_scale + j0 + 16 * c)
                           : _mm512_set1_ps(1.f);
    bias[c] = p.bias ? _mm512_maskz_loadu_ps(inside[c], p.bias + j0 + 16 * c)
                     : _mm512_setzero_ps();
  }
  store_tile<kTileRows>(sums, rows, w_scale, bias, inside, p.gelu, p.approximate, p.dtype,
                        static_cast<char*>(p.out) + (i0 * p.n + j0) * dtype_size(p.dtype), p.n);
}

TRANSFUSE_BF16 void run_tile(int64_t rows, const uint16_t* x, int64_t stride, int64_t pairs,
                             const uint32_t* panel, const GemmParams& p, int64_t i0, int64_t j0) {
  __m512 sums[kTileRows][kPanelVectors];
  switch (rows) {
    case 1: tile_product<1>(x, stride, pairs, panel, sums); break;
    case 2: tile_product<2>(x, stride, pairs, panel, sums); break;
    case 3: tile_product<3>(x, stride, pairs, panel, sums); break;
    case 4: tile_product<4>(x, stride, pairs, panel, sums); break;
    case 5: tile_product<5>(x, stride, pairs, panel, sums); break;
    default: tile_product<6>(x, stride, pairs, panel, sums); break;
  }
  tile_store(sums, rows, p, i0, j0);
}

TRANSFUSE_BF16 void gemm_bf16_avx512(const GemmParams& p) {
  const int64_t pairs = (p.k + 1) / 2;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  int64_t stride = p.k;
  std::vector<uint16_t> padded;  // an odd k: rows copied with a zero column
  if (p.k % 2) {
    stride = p.k + 1;
    padded.assign(p.m * stride, 0);
    for (int64_t i = 0; i < p.m; ++i)
      std::memcpy(padded.data() + i * stride, x + i * p.k, p.k * sizeof(uint16_t));
    x = padded.data();
  }
  const int64_t panels = (p.n + kPanelCols - 1) / kPanelCols, words = panel_words(p.k);
  // bf16 panels kept packed, or an int8 weight's (pack_weight_int8_pairs)
  const auto* packed = p.w_int8 ? nullptr : static_cast<const uint32_t*>(p.w_packed);
  const auto* packed_int8 = p.w_int8 ? static_cast<const int8_t*>(p.w_packed) : nullptr;
  in_team(threads_for(p.num_threads, panels, p.m * p.n * p.k, kMinWorkPerThread),
          [&]() TRANSFUSE_BF16 {
    const auto own = uninitialized<uint32_t>(packed ? 0 : words);  // this thread's panel
#pragma omp for schedule(static)
    for (int64_t panel_index = 0; panel_index < panels; ++panel_index) {
      const int64_t j0 = panel_index * kPanelCols;
      const uint32_t* panel = packed ? packed + panel_index * words : own.get();
      if (packed_int8)
        widen_panel(packed_int8 + panel_index * 2 * words, words, own.get());
      else if (p.w_int8)
        pack_panel(static_cast<const int8_t*>(p.w), p.n, p.k, j0, own.get());
      else if (!packed)
        pack_panel(static_cast<const uint16_t*>(p.w), p.n, p.k, j0, own.get());
      for (int64_t i0 = 0; i0 < p.m; i0 += kTileRows)
        run_tile(std::min(kTileRows, p.m - i0), x + i0 * stride, stride, pairs, panel, p, i0, j0);
    }
  });
}

TRANSFUSE_BF16 void pack_all_panels(const uint16_t* w, int64_t n, int64_t k, uint32_t* packed,
                                    int num_threads) {
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols, words = panel_words(k);
  in_team(threads_for(num_threads, panels, n * k, kMinWorkPerThread), [&]() TRANSFUSE_BF16 {
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel)
      pack_panel(w, n, k, panel * kPanelCols, packed + panel * words);
  });
}

TRANSFUSE_BF16 void pack_all_int8_pairs(const int8_t* w, int64_t n, int64_t k, int8_t* packed,
                                        int num_threads) {
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols, words = panel_words(k);
  in_team(threads_for(num_threads, panels, n * k, kMinWorkPerThread), [&]() TRANSFUSE_BF16 {
    const auto panel = uninitialized<uint32_t>(words);
#pragma omp for schedule(static)
    for (int64_t index = 0; index < panels; ++index) {
      pack_panel(w, n, k, index * kPanelCols, panel.get());
      narrow_panel(panel.get(), words, packed + index * 2 * words);
    }
  });
}

}  // namespace
#endif

bool has_gemm_bf16() {
#ifdef TRANSFUSE_X86_MULTIVERSION
  static const bool has = vector_isa() == VectorIsa::avx512 &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

int64_t packed_weight_bytes_bf16(int64_t n, int64_t k) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  return (n + kPanelCols - 1) / kPanelCols * panel_words(k) * int64_t(sizeof(uint32_t));
#else
  return 0;
#endif
}

bool pack_weight_bf16(const uint16_t* w, int64_t n, int64_t k, void* packed, int num_threads) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (!has_gemm_bf16()) return false;
  pack_all_panels(w, n, k, static_cast<uint32_t*>(packed), num_threads);
  return true;
#else
  return false;
#endif
}

int64_t packed_weight_bytes_int8_pairs(int64_t n, int64_t k) {
  return packed_weight_bytes_bf16(n, k) / 2;
}

bool pack_weight_int8_pairs(const int8_t* w, int64_t n, int64_t k, void* packed,
                            int num_threads) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (!has_gemm_bf16()) return false;
  pack_all_int8_pairs(w, n, k, static_cast<int8_t*>(packed), num_threads);
  return true;
#else
  return false;
#endif
}

bool gemm_bf16(const GemmParams& p) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (!has_gemm_bf16() || p.x_scale) return false;
  gemm_bf16_avx512(p);
  return true;
#else
  return false;
#endif
}

}  // namespace transfuse::cpu
