// AMX (Intel's Advanced Matrix Extensions, x86-64 Linux): eight tile registers of up to 16 rows x
// 64 bytes, and tile instructions that multiply them, such as tdpbssd (s8 x s8 into int32: a
// 16 x 16 tile += 16 x 64 times 64 x 16 per instruction).
// A process may use the tiles only once Linux grants it their state (arch_prctl
// ARCH_REQ_XCOMP_PERM), and a thread only after loading a tile configuration.
#pragma once

#include "multiversion.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include <cstdint>
#include <vector>

#define TRANSFUSE_AMX __attribute__((target("avx512f,avx512bw,amx-tile,amx-int8")))

namespace transfuse::cpu {

// Whether this process may run AMX-INT8: the CPU has it, Linux granted the tile state, and
// TRANSFUSE_CPU_ISA names no narrower set ("avx512" keeps AVX-512 without AMX).
bool has_amx();

// The int8 GEMM on AMX (int8_vnni.cpp) computes out^T = w x^T a panel of 64 weight rows at a
// time: the weights are the A operand, read as stored (16 rows x 64 bytes of k per tile), and x
// the B operand, whose tile rows hold 16 tokens x one 32-bit word of k (4 int8).
constexpr int64_t kAmxPanelRows = 64;  // weight rows per panel: two halves of 2 x 2 output tiles
constexpr int64_t kAmxTokens = 32;     // tokens per block: two tiles

// The B operand: xt[g][t] = 32-bit word g of row t of x [m rows of row_bytes bytes], zero past a
// row and for t in [m, m_pad); g < words (whole 64-byte chunks of k), m_pad a multiple of 16.
void pack_words(const void* x, int64_t m, int64_t row_bytes, int64_t words, int64_t m_pad,
                uint32_t* xt);

// Weight rows [j0, j0 + 64) of w [n rows of row_bytes bytes] as the tiles read them, in whole
// 64-byte chunks (stride_out bytes apart): w itself where those reads stay inside its rows, else
// a copy zero-padded past n and past each row, in `copy`.
const uint8_t* weight_panel(const void* w, int64_t n, int64_t row_bytes, int64_t j0,
                            std::vector<uint8_t>& copy, int64_t* stride_out);

// sums[t][c] = sums_t[c][t], 32-bit elements: out^T [64][32] of a panel into out [32][64].
void transpose_block(const uint32_t sums_t[kAmxPanelRows][kAmxTokens],
                     uint32_t sums[kAmxTokens][kAmxPanelRows]);

// Every tile 16 rows of 64 bytes: the operands (A: 16 rows x 64 int8 of k; B: 16 groups of 4 k
// x 16 columns) and the 16 x 16 int32 products.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Loads the configuration above for the calling thread while alive; releases the tiles after.
class TileScope {
 public:
  TRANSFUSE_AMX TileScope() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  TRANSFUSE_AMX ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

}  // namespace transfuse::cpu

#else

namespace transfuse::cpu {
inline bool has_amx() { return false; }
}  // namespace transfuse::cpu

#endif
