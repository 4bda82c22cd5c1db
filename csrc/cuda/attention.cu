// CUDA attention forward on tensor cores (FlashAttention-2 style), fp16 / bf16 in, fp32 accumulate.
// The math is stated in common/attention.h.
//
// How the work is laid out.
//   A CTA of 4 warps owns kBlockM "rows" of one (batch, head) and walks over the key tiles of
//   kBlockN keys that any of its rows can see. Warp w owns rows [w * 16R, (w + 1) * 16R), R = 1
//   or 2 row-blocks of 16 rows, each the M side of mma.sync.m16n8k16 (row.col, fp32 accumulate).
//   Per key tile a warp computes S = Q K^T for its rows (ldmatrix from shared memory; Q's
//   fragments stay in registers for head_dim <= 192), turns S into scores in log2 units
//   (scale * log2(e) folded in; softcap = cap * tanh(s / cap) before the mask; bounds, causal /
//   window and the bool / additive mask applied where the tile needs it), updates the running
//   max and sum of every row (online softmax with exp2), rescales its output accumulator and
//   adds P V (P rounded to the input dtype, V read with ldmatrix.trans). Nothing of the
//   seq_q x seq_kv matrix leaves registers. A warp whose rows all lie past len_q only loads.
//   Masks are read from global memory through their 4 strides, a thread's own elements (L1 and
//   L2 serve the reuse); the kernels with a mask are separate instantiations, so the ones
//   without carry none of that code.
//
//   Shared memory: Q [kBlockM x kD], then two stages of K [kBlockN x kD] and two of V. Rows are
//   16-byte chunks; with a multiple of 8 chunks a row (head_dim buckets 64, 128, 192, 256) the
//   chunk index is XOR-swizzled with row % 8, else (32, 96) rows are padded by one chunk; both
//   make the 8 rows an ldmatrix phase reads fall in distinct banks. Tiles are loaded with
//   cp.async (16 bytes; zero-filled past len_kv and past head_dim up to the bucket), one stage
//   ahead of the compute: iteration n waits for tile n, syncs, issues tile n + 1 into the other
//   stage and computes on tile n. Inputs that are not 16-byte aligned (pointer or a stride not a
//   multiple of 8 elements) are loaded by scalar loads into the same layout instead.
//
//   The output is normalised in registers, staged through the warp's own Q rows in shared memory
//   and written with 16-byte stores (scalar ones when out is not aligned), lse beside it.
//
//   Head_dim buckets (kD), tile sizes (query rows x keys) and dynamic shared memory:
//     kD  32: 128 x 64, 30 KB (with a mask 64 x 64, 25 KB)      kD 128: 64 x 64, 80 KB
//     kD  64: 128 x 64, 48 KB (with a mask 64 x 64, 40 KB)      kD 192: 64 x 32, 72 KB
//     kD  96:  64 x 64, 65 KB                                    kD 256: 64 x 32, 96 KB
//   (kD 256 re-reads Q's fragments from shared memory each tile). head_dim is any multiple of 8
//   up to 256; the columns past it up to kD are zeros. All fit the 99 KB of sm_86 / sm_89.
//
// Decoding (seq_q <= 16).
//   GQA: the query heads sharing a key/value head are packed into the rows of one CTA (row m is
//   query head h_kv * group + m / len_q, query row m % len_q), so K and V are read once for the
//   group. Split-KV: when the CTAs would not fill the GPU, each CTA cuts the key tiles its rows
//   see, [n_begin, n_end), into `splits` even ranges of ceil((n_end - n_begin) / splits) tiles
//   and takes range `split` (possibly empty); every split writes its normalised partial output
//   and its lse (fp32, -inf where it saw no key) to the workspace at the row's padded position
//   (b, h, i) of [splits, batch, heads_q, seq_q], and attention_combine_kernel merges them:
//   out = sum_s w_s O_s / sum_s w_s with w_s = exp(lse_s - max_s lse_s).
//
// Packed ("varlen") layout (common/attention.h). Sequence b is batch entry b with its own
// lengths len_q, len_kv and its rows starting at q_start, kv_start: a CTA reads them from
// cu_seqlens once (the padded layout is the case start = 0, len = seq_q / seq_kv), offsets its
// q / k / v / out base pointers by start * row stride, and aligns causal / window with
// len_kv - len_q; seq_q and seq_kv, the largest lengths, size the grid, and a CTA whose tile lies
// past its sequence's rows returns at once. The lse goes to lse_index (packed: [heads_q,
// total_q]); the split-KV workspace keeps padded positions, and the combine skips rows i >= len_q.
//
// Grid: one-dimensional, block = tile + m_tiles * (split + splits * (head + heads * batch)),
// the query tiles of a head are neighbours (they share K and V in L2), and the heaviest causal
// tiles go first.

#include "attention.h"

#include "device.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace transfuse::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Additive mask values below this are clamped to it (-inf stays -inf), so that bias * log2(e)
// stays finite: a row whose every key carries finfo.min still gets a softmax (uniform), as in
// fp32 torch, instead of turning into "no visible key".
constexpr float kMinBias = -2.0e38f;
constexpr unsigned kFullMask = 0xffffffffu;

enum MaskType : int { kMaskNone = 0, kMaskBool = 1, kMaskF32 = 2, kMaskF16 = 3, kMaskBF16 = 4 };

// Everything a kernel needs, filled on the host (int: sequence lengths, heads and batch are far
// below 2^30; element offsets are int64).
struct ForwardArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;                  // at lse_index(): [batch, heads_q, seq_q] or [heads_q, total_q]; or null
  const void* mask;
  const int32_t* cu_seqlens_q; // packed layout: [batch + 1] row offsets of the sequences; else null
  const int32_t* cu_seqlens_k; // packed layout: [batch + 1]; else null
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t out_strides[3];
  int64_t mask_strides[4];
  float* partial_out;          // split-KV: [splits, rows, head_dim] fp32
  float* partial_lse;          // split-KV: [splits, rows] fp32
  int64_t rows;                // batch * heads_q * seq_q (padded positions)
  int64_t block_offset;        // of this launch's first block (grids above 2^31 - 1 blocks)
  int batch;
  int heads_q;
  int group;                   // heads_q / heads_kv
  int seq_q;                   // the largest len_q (the grid's extent)
  int seq_kv;                  // the largest len_kv
  int total_q;                 // rows of q along strides[2]: total_q packed, seq_q padded
  int total_kv;                // rows of k / v: total_kv packed, seq_kv padded
  int head_dim;
  int heads_grid;              // heads of the grid: heads_kv when gqa_rows, else heads_q
  int m_tiles;                 // row tiles of the longest sequence's grid head
  int splits;
  int window;                  // 0: none; else clamped to seq_q + seq_kv + 1
  int mask_type;               // MaskType
  float scale_log2;            // scale * log2(e)
  float softcap_log2;          // softcap * log2(e)
  float scale_over_softcap;    // scale / softcap
  bool causal;
  bool gqa_rows;               // a grid head's rows run over the group's query heads (decoding)
  bool has_softcap;
  bool vec_in;                 // q, k, v 16-byte aligned rows: cp.async
  bool vec_out;                // out 16-byte aligned rows: vector stores
};

// ------------------------------------------------------------------------------------------------
// PTX wrappers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void st_shared_v4(uint32_t dst, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(a), "r"(b), "r"(c), "r"(d)
               : "memory");
}

__device__ __forceinline__ void st_shared_u32(uint32_t dst, uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(dst), "r"(value) : "memory");
}

__device__ __forceinline__ uint4 ld_shared_v4(uint32_t src) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(src)
               : "memory");
  return v;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t src) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(src));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t src) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(src));
}

// d += a b: a 16x16 (row-major fragment), b 16x8 (col), d 16x8 fp32.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x; 2^-inf = 0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// tanh(x) = 1 - 2 / (e^2x + 1): absolute error a few 1e-7 over the whole range (x is clamped
// where tanh is 1 in fp32), several times cheaper than tanhf.
__device__ __forceinline__ float tanh_fast(float x) {
  const float clamped = fminf(fmaxf(x, -15.f), 15.f);
  return 1.f - __fdividef(2.f, exp2_approx(clamped * (2.f * kLog2e)) + 1.f);
}

// Two floats as the 32-bit word of two T (lo in the low half, as mma fragments want).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t word;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    memcpy(&word, &pair, sizeof(word));
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    memcpy(&word, &pair, sizeof(word));
  }
  return word;
}

// Element `index` of an additive mask: fp32, or 16-bit (bf16 when `bf16`, else f16).
template <bool kF32>
__device__ __forceinline__ float load_bias(const void* mask, int64_t index, bool bf16) {
  if constexpr (kF32) {
    return static_cast<const float*>(mask)[index];
  } else {
    const unsigned short bits = static_cast<const unsigned short*>(mask)[index];
    return bf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16) : __half2float(__ushort_as_half(bits));
  }
}

// ------------------------------------------------------------------------------------------------
// Shared-memory tiles
// ------------------------------------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kD-element rows (see the top).
template <int kD>
struct TileLayout {
  static constexpr int kChunks = kD / 8;
  static constexpr bool kSwizzle = kChunks % 8 == 0;
  static constexpr int kRowBytes = (kSwizzle ? kD : kD + 8) * 2;

  __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
    if constexpr (kSwizzle) {
      return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
    } else {
      return static_cast<uint32_t>(row * kRowBytes + (chunk << 4));
    }
  }
};

// One 16-byte chunk (8 elements) global -> shared: cp.async when aligned, scalar loads when not,
// zeros when the chunk lies outside the tensor.
__device__ __forceinline__ void copy_chunk(uint32_t dst, const uint16_t* src, bool valid, bool vectorized) {
  if (!valid) {
    st_shared_v4(dst, 0u, 0u, 0u, 0u);
  } else if (vectorized) {
    cp_async_16(dst, src);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<uint32_t>(src[2 * i]) | (static_cast<uint32_t>(src[2 * i + 1]) << 16);
    }
    st_shared_v4(dst, w[0], w[1], w[2], w[3]);
  }
}

struct RowCoords {
  int h;  // query head
  int i;  // query row
};

// Row m of a grid head: with gqa_rows they run over the group's query heads, len_q rows each.
__device__ __forceinline__ RowCoords row_coords(const ForwardArgs& a, int len_q, int head0, int m) {
  if (!a.gqa_rows) return {head0, m};
  const int head_in_group = m / len_q;
  return {head0 + head_in_group, m - head_in_group * len_q};
}

// Sequence b's rows: q rows q_start .. q_start + len_q - 1 (along strides[2]), keys kv_start ..
// kv_start + len_kv - 1. Padded layout: 0, seq_q, 0, seq_kv. Packed: from cu_seqlens, clamped to
// the tensors' rows and to the grid's extent, so a bad cu_seqlens cannot reach out of bounds.
struct Sequence {
  int q_start, len_q, kv_start, len_kv;
};

__device__ __forceinline__ int clamp_int(int64_t x, int lo, int hi) {
  return static_cast<int>(x < lo ? lo : x > hi ? hi : x);
}

__device__ __forceinline__ Sequence sequence_of(const ForwardArgs& a, int b) {
  const SequenceSpan span = sequence_span(a.cu_seqlens_q, a.cu_seqlens_k, b, a.seq_q, a.seq_kv);
  Sequence s;
  s.q_start = clamp_int(span.q_start, 0, a.total_q);
  s.len_q = clamp_int(span.q_len, 0, min(a.seq_q, a.total_q - s.q_start));
  s.kv_start = clamp_int(span.kv_start, 0, a.total_kv);
  s.len_kv = clamp_int(span.kv_len, 0, min(a.seq_kv, a.total_kv - s.kv_start));
  return s;
}

// c * stride, computed where it stands: a volatile asm is not hoisted out of the key loop, where
// one 64-bit product per column of the tile would stay live in registers.
__device__ __forceinline__ int64_t strided_offset(int c, int64_t stride) {
  int64_t product;
  asm volatile("mul.lo.s64 %0, %1, %2;\n" : "=l"(product) : "l"(int64_t(c)), "l"(stride));
  return product;
}

// Scores of keys a row may not see -> -inf; the bool mask hides more, the additive one adds.
// s holds scores in log2 units for keys key0 + nt * 8 + 2t + (e & 1) of the thread's rows
// r = 2 rb + (e >> 1); diag[r] = i + len_kv - len_q of row r. Every test is against the column
// c = nt * 8 + (e & 1) relative to key0 + 2t, a compile-time constant: per row, the visible
// columns are [lo, hi] (bounds, causal, window), computed once per tile.
// kMask: kMaskNone, kMaskBool, kMaskF32, or kMaskF16 for both 16-bit dtypes.
template <int kMask, int kRowBlocks, int kNTiles>
__device__ __forceinline__ void mask_scores(float (&s)[kRowBlocks][kNTiles][4], const ForwardArgs& a,
                                            int len_kv, int key0, int t, const int (&diag)[2 * kRowBlocks],
                                            const int64_t (&mask_row)[2 * kRowBlocks]) {
  constexpr int kRows = 2 * kRowBlocks;
  const int first = key0 + 2 * t;
  const bool bf16 = a.mask_type == kMaskBF16;
  int lo[kRows], hi[kRows];
  int64_t mask_at[kRows];  // element index of the mask at key `first`
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    lo[r] = 0;
    hi[r] = len_kv - 1 - first;
    if (a.causal) hi[r] = min(hi[r], diag[r] - first);
    if (a.window > 0) {
      lo[r] = max(lo[r], diag[r] - a.window + 1 - first);
      hi[r] = min(hi[r], diag[r] + a.window - 1 - first);
    }
    if constexpr (kMask != kMaskNone) mask_at[r] = mask_row[r] + int64_t(first) * a.mask_strides[3];
  }
#pragma unroll
  for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = rb * 2 + (e >> 1);
        const int c = nt * 8 + (e & 1);
        bool visible = c >= lo[r] && c <= hi[r];
        float x = s[rb][nt][e];
        if constexpr (kMask != kMaskNone) {
          if (visible) {
            const int64_t index = mask_at[r] + strided_offset(c, a.mask_strides[3]);
            if constexpr (kMask == kMaskBool) {
              visible = static_cast<const uint8_t*>(a.mask)[index] != 0;
            } else {
              const float bias = load_bias<kMask == kMaskF32>(a.mask, index, bf16);
              // -inf hides the key; NaN stays NaN.
              x = bias == -INFINITY ? -INFINITY : x + (bias < kMinBias ? kMinBias : bias) * kLog2e;
            }
          }
        }
        s[rb][nt][e] = visible ? x : -INFINITY;
      }
    }
  }
}

// Per-lane parts of the ldmatrix addresses of one access pattern: lane row `lane_row` (a row
// offset that is a multiple of 8 comes on top) and chunk 2p + x of pair p. A swizzle XORs the
// chunk's low 3 bits with row % 8 = lane_row % 8, so pair p lies at off[p % 4] + 128 (p / 4):
// four registers, and the rest of every address is a compile-time constant.
template <int kD>
struct LaneOffsets {
  uint32_t off[4];
  __device__ __forceinline__ LaneOffsets(int lane_row, int x) {
#pragma unroll
    for (int q = 0; q < 4; ++q) off[q] = TileLayout<kD>::offset(lane_row, 2 * q + x);
  }
  // Address of pair p (chunks 2p, 2p + 1) at row offset `rows` (a multiple of 8) in `tile`.
  __device__ __forceinline__ uint32_t at(uint32_t tile, int rows, int p) const {
    return tile + off[p & 3] + static_cast<uint32_t>((p >> 2) * 128 + rows * TileLayout<kD>::kRowBytes);
  }
};

// ------------------------------------------------------------------------------------------------
// Forward kernel
// ------------------------------------------------------------------------------------------------

template <int kD, int kBlockM, int kBlockN>
constexpr int forward_smem_bytes() {
  return (kBlockM + 4 * kBlockN) * TileLayout<kD>::kRowBytes;
}

template <typename T, int kD, int kBlockM, int kBlockN, bool kQInRegs, bool kMasked>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const ForwardArgs a) {
  using Layout = TileLayout<kD>;
  constexpr int kChunks = Layout::kChunks;
  constexpr int kRowBytes = Layout::kRowBytes;
  constexpr int kRowBlocks = kBlockM / (16 * kWarps);  // 16-row mma blocks a warp owns
  constexpr int kWarpRows = 16 * kRowBlocks;
  constexpr int kRows = 2 * kRowBlocks;                // rows a thread holds values of
  constexpr int kNTiles = kBlockN / 8;                 // n-tiles of S
  constexpr int kKSteps = kD / 16;                     // k-steps of Q K^T
  constexpr int kOTiles = kD / 8;                      // n-tiles of O
  constexpr int kPvSteps = kBlockN / 16;               // k-steps of P V
  // Loads: thread tid copies chunk tid % kLoadChunks of rows tid / kLoadChunks + k * kLoadRows
  // (kLoadChunks: kChunks rounded up to a power of 2; the threads past kChunks idle).
  constexpr int kLoadChunks = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  constexpr int kLoadRows = kThreads / kLoadChunks;
  static_assert(kRowBlocks >= 1 && kBlockM == kRowBlocks * 16 * kWarps, "kBlockM: 64 or 128");
  static_assert(kD % 16 == 0 && kD <= 256 && kBlockN % 16 == 0, "tile sizes");
  static_assert(kBlockM % kLoadRows == 0 && kBlockN % kLoadRows == 0, "tiles split evenly over the threads");

  extern __shared__ uint4 smem[];
  const uint32_t smem_q = smem_address(smem);
  const uint32_t smem_k = smem_q + kBlockM * kRowBytes;
  const uint32_t smem_v = smem_k + 2 * kBlockN * kRowBytes;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;  // mma row group
  const int t = lane & 3;   // thread in the group

  // ---- which tile ----
  int64_t block = a.block_offset + blockIdx.x;
  const int m_tile = a.m_tiles - 1 - static_cast<int>(block % a.m_tiles);
  block /= a.m_tiles;
  const int split = static_cast<int>(block % a.splits);
  block /= a.splits;
  const int head = static_cast<int>(block % a.heads_grid);
  const int b = static_cast<int>(block / a.heads_grid);
  const int kv_head = a.gqa_rows ? head : head / a.group;
  const int head0 = a.gqa_rows ? head * a.group : head;  // query head of row 0
  const Sequence seq = sequence_of(a, b);
  const int len_q = seq.len_q;
  const int len_kv = seq.len_kv;
  const int m_total = a.gqa_rows ? a.group * len_q : len_q;  // rows of this grid head
  const int m0 = m_tile * kBlockM;
  if (m0 >= m_total) return;  // past the end of a shorter sequence (packed layout)
  const int rows_valid = min(kBlockM, m_total - m0);
  const int d_chunks = a.head_dim / 8;
  const int offset = len_kv - len_q;  // query row i is aligned with key i + offset

  // Query rows of the tile (all of them when it spans two heads) and the keys they may see.
  int i_lo, i_hi;
  {
    const RowCoords first = row_coords(a, len_q, head0, m0);
    const RowCoords last = row_coords(a, len_q, head0, m0 + rows_valid - 1);
    i_lo = first.i;
    i_hi = last.i;
    if (first.h != last.h) {
      i_lo = 0;
      i_hi = len_q - 1;
    }
  }
  int j_lo = 0;
  int j_hi = len_kv;
  if (a.window > 0) {
    j_lo = max(0, i_lo + offset - a.window + 1);
    j_hi = min(j_hi, i_hi + offset + a.window);
  }
  if (a.causal) j_hi = min(j_hi, i_hi + offset + 1);
  int n_begin = j_lo / kBlockN;
  int n_end = j_hi > j_lo ? (j_hi + kBlockN - 1) / kBlockN : n_begin;
  if (a.splits > 1) {  // range `split` of `splits` even ranges of these tiles
    const int per_split = (n_end - n_begin + a.splits - 1) / a.splits;
    n_begin = min(n_end, n_begin + split * per_split);
    n_end = min(n_end, n_begin + per_split);
  }
  const int n_count = n_end - n_begin;

  // ---- loads ----
  const int load_c = tid % kLoadChunks;
  const int load_row = tid / kLoadChunks;
  const bool load_in_row = load_c < kChunks;     // the chunk exists in the tile
  const bool load_in_dim = load_c < d_chunks;    // ... and holds columns below head_dim
  const uint32_t load_dst = Layout::offset(load_row, load_c);
  // kLoadRows >= 8 keeps row % 8 (the swizzle) of a thread's rows; 4 flips its bit 2 every step.
  auto load_offset = [&](int step) -> uint32_t {
    if constexpr (Layout::kSwizzle && kLoadRows % 8 != 0) {
      return Layout::offset(load_row + step * kLoadRows, load_c);
    } else {
      return load_dst + static_cast<uint32_t>(step * kLoadRows * kRowBytes);
    }
  };
  const uint16_t* k_base = static_cast<const uint16_t*>(a.k) + int64_t(b) * a.k_strides[0] +
                           int64_t(kv_head) * a.k_strides[1] + int64_t(seq.kv_start) * a.k_strides[2] + load_c * 8;
  const uint16_t* v_base = static_cast<const uint16_t*>(a.v) + int64_t(b) * a.v_strides[0] +
                           int64_t(kv_head) * a.v_strides[1] + int64_t(seq.kv_start) * a.v_strides[2] + load_c * 8;

  auto load_q = [&]() {
    if (!load_in_row) return;
    const uint16_t* q_base = static_cast<const uint16_t*>(a.q) + int64_t(b) * a.q_strides[0] +
                             int64_t(seq.q_start) * a.q_strides[2] + load_c * 8;
#pragma unroll
    for (int step = 0; step < kBlockM / kLoadRows; ++step) {
      const int row = load_row + step * kLoadRows;
      const RowCoords rc = row_coords(a, len_q, head0, m0 + min(row, rows_valid - 1));
      const uint16_t* src = q_base + int64_t(rc.h) * a.q_strides[1] + int64_t(rc.i) * a.q_strides[2];
      copy_chunk(smem_q + load_offset(step), src, load_in_dim && row < rows_valid, a.vec_in);
    }
  };
  auto load_kv = [&](int n, int stage) {
    if (!load_in_row) return;
    const int key = n * kBlockN + load_row;
    const uint16_t* k_src = k_base + int64_t(key) * a.k_strides[2];
    const uint16_t* v_src = v_base + int64_t(key) * a.v_strides[2];
    const int64_t k_step = int64_t(kLoadRows) * a.k_strides[2];
    const int64_t v_step = int64_t(kLoadRows) * a.v_strides[2];
    const uint32_t k_dst = smem_k + stage * (kBlockN * kRowBytes);
    const uint32_t v_dst = smem_v + stage * (kBlockN * kRowBytes);
#pragma unroll
    for (int step = 0; step < kBlockN / kLoadRows; ++step) {
      const bool valid = load_in_dim && key + step * kLoadRows < len_kv;
      copy_chunk(k_dst + load_offset(step), k_src, valid, a.vec_in);
      copy_chunk(v_dst + load_offset(step), v_src, valid, a.vec_in);
      k_src += k_step;
      v_src += v_step;
    }
  };

  // ---- the thread's rows: g and g + 8 of each of its row-blocks ----
  const int warp_row0 = warp * kWarpRows;
  int diag[kRows];
  int64_t mask_row[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = warp_row0 + (r >> 1) * 16 + (r & 1) * 8 + g;
    const RowCoords rc = row_coords(a, len_q, head0, m0 + min(row, rows_valid - 1));
    diag[r] = rc.i + offset;
    mask_row[r] = kMasked ? int64_t(b) * a.mask_strides[0] + int64_t(rc.h) * a.mask_strides[1] +
                                int64_t(rc.i) * a.mask_strides[2]
                          : 0;
  }

  float acc[kRowBlocks][kOTiles][4];
#pragma unroll
  for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
    for (int ot = 0; ot < kOTiles; ++ot) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[rb][ot][e] = 0.f;
    }
  }
  float row_max[kRows];  // log2 units
  float row_sum[kRows];  // this thread's part of the row sum
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const bool warp_active = warp_row0 < rows_valid;

  if (n_count > 0) {
    // ldmatrix patterns (see LaneOffsets):
    //   Q (A operand, x4): lanes 0-15 rows 0-15 chunk 2p, lanes 16-31 rows 0-15 chunk 2p + 1
    //   K (B operand, x4): matrices (keys 0-7, chunk 2p), (0-7, 2p + 1), (8-15, 2p), (8-15, 2p + 1)
    //   V (B operand, x4.trans): (keys 0-7, chunk 2p), (8-15, 2p), (0-7, 2p + 1), (8-15, 2p + 1)
    const LaneOffsets<kD> q_lanes(lane & 15, lane >> 4);
    const LaneOffsets<kD> k_lanes(((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1);
    const LaneOffsets<kD> v_lanes(lane & 15, lane >> 4);

    load_q();
    load_kv(n_begin, 0);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    uint32_t q_frag[kQInRegs ? kRowBlocks : 1][kQInRegs ? kKSteps : 1][4];
    if constexpr (kQInRegs) {
      if (warp_active) {
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
          for (int kk = 0; kk < kKSteps; ++kk) ldmatrix_x4(q_frag[rb][kk], q_lanes.at(smem_q, warp_row0 + rb * 16, kk));
        }
      }
    }

    for (int it = 0; it < n_count; ++it) {
      if (it > 0) {
        cp_async_wait_all();  // tile it (issued during iteration it - 1) has landed
        __syncthreads();      // ... for every thread; and stage (it + 1) & 1 is read no more
      }
      if (it + 1 < n_count) load_kv(n_begin + it + 1, (it + 1) & 1);
      cp_async_commit();
      if (!warp_active) continue;

      const int stage = it & 1;
      const uint32_t k_tile = smem_k + stage * (kBlockN * kRowBytes);
      const uint32_t v_tile = smem_v + stage * (kBlockN * kRowBytes);
      const int key0 = (n_begin + it) * kBlockN;

      // ---- S = Q K^T ----
      float s[kRowBlocks][kNTiles][4];
#pragma unroll
      for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[rb][nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t qa[kRowBlocks][4];
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) {
          if constexpr (kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) qa[rb][e] = q_frag[rb][kk][e];
          } else {
            ldmatrix_x4(qa[rb], q_lanes.at(smem_q, warp_row0 + rb * 16, kk));
          }
        }
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t kb[4];  // b0, b1 of n-tile 2 np, then of n-tile 2 np + 1
          ldmatrix_x4(kb, k_lanes.at(k_tile, np * 16, kk));
#pragma unroll
          for (int rb = 0; rb < kRowBlocks; ++rb) {
            mma_16816<T>(s[rb][2 * np], qa[rb], kb[0], kb[1]);
            mma_16816<T>(s[rb][2 * np + 1], qa[rb], kb[2], kb[3]);
          }
        }
      }

      // ---- scores in log2 units: scale (and softcap), then what the tile needs masked ----
      if (a.has_softcap) {
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[rb][nt][e] = a.softcap_log2 * tanh_fast(s[rb][nt][e] * a.scale_over_softcap);
          }
        }
      } else {
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[rb][nt][e] *= a.scale_log2;
          }
        }
      }
      if constexpr (kMasked) {
        switch (a.mask_type) {
          case kMaskBool: mask_scores<kMaskBool>(s, a, len_kv, key0, t, diag, mask_row); break;
          case kMaskF32: mask_scores<kMaskF32>(s, a, len_kv, key0, t, diag, mask_row); break;
          default: mask_scores<kMaskF16>(s, a, len_kv, key0, t, diag, mask_row); break;
        }
      } else {
        // Without a mask, only the tiles at an edge (len_kv, causal diagonal, window) need it.
        bool full = key0 + kBlockN <= len_kv;
        if (a.causal) full = full && key0 + kBlockN - 1 <= i_lo + offset;
        if (a.window > 0) {
          full = full && (i_hi + offset) - key0 < a.window && (key0 + kBlockN - 1) - (i_lo + offset) < a.window;
        }
        if (!full) mask_scores<kMaskNone>(s, a, len_kv, key0, t, diag, mask_row);
      }

      // ---- online softmax ----
#pragma unroll
      for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = rb * 2 + hf;
          float mx = row_max[r];
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[rb][nt][2 * hf], s[rb][nt][2 * hf + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
          const float base = mx == -INFINITY ? 0.f : mx;  // no key seen yet: every p is 0
          const float alpha = exp2_approx(row_max[r] - base);
          row_max[r] = mx;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = exp2_approx(s[rb][nt][2 * hf + e] - base);
              s[rb][nt][2 * hf + e] = p;
              sum += p;
            }
          }
          row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
          for (int ot = 0; ot < kOTiles; ++ot) {
            acc[rb][ot][2 * hf] *= alpha;
            acc[rb][ot][2 * hf + 1] *= alpha;
          }
        }
      }

      // ---- O += P V ----
#pragma unroll
      for (int kk = 0; kk < kPvSteps; ++kk) {
        uint32_t pa[kRowBlocks][4];  // the A fragment of keys 16 kk .. 16 kk + 15 is S's n-tiles 2 kk, 2 kk + 1
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) {
          pa[rb][0] = pack_pair<T>(s[rb][2 * kk][0], s[rb][2 * kk][1]);
          pa[rb][1] = pack_pair<T>(s[rb][2 * kk][2], s[rb][2 * kk][3]);
          pa[rb][2] = pack_pair<T>(s[rb][2 * kk + 1][0], s[rb][2 * kk + 1][1]);
          pa[rb][3] = pack_pair<T>(s[rb][2 * kk + 1][2], s[rb][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kOTiles / 2; ++dp) {
          uint32_t vb[4];  // b0, b1 of O n-tile 2 dp, then of n-tile 2 dp + 1
          ldmatrix_x4_trans(vb, v_lanes.at(v_tile, kk * 16, dp));
#pragma unroll
          for (int rb = 0; rb < kRowBlocks; ++rb) {
            mma_16816<T>(acc[rb][2 * dp], pa[rb], vb[0], vb[1]);
            mma_16816<T>(acc[rb][2 * dp + 1], pa[rb], vb[2], vb[3]);
          }
        }
      }
    }
  }

  // ---- epilogue ----
  __syncthreads();  // every warp is done with shared memory; the Q rows become the staging area
  // The sequence's rows once more (two loads a CTA in the packed layout) rather than q_start
  // and len_q held in registers through the key loop.
  const Sequence rows_of = sequence_of(a, b);
  const bool partial = a.splits > 1;
  float inv[kRows];
  float lse[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    const bool empty = row_max[r] == -INFINITY;  // no visible key
    inv[r] = empty ? 0.f : 1.f / l;
    lse[r] = empty ? (partial ? -INFINITY : INFINITY) : row_max[r] * kLn2 + logf(l);
  }

  if (partial) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp_row0 + (r >> 1) * 16 + (r & 1) * 8 + g;
      if (row >= rows_valid) continue;
      const RowCoords rc = row_coords(a, rows_of.len_q, head0, m0 + row);
      const int64_t index = (int64_t(b) * a.heads_q + rc.h) * a.seq_q + rc.i;  // padded position
      float* dst = a.partial_out + (int64_t(split) * a.rows + index) * a.head_dim;
#pragma unroll
      for (int ot = 0; ot < kOTiles; ++ot) {
        const int col = ot * 8 + 2 * t;
        if (col < a.head_dim) {
          *reinterpret_cast<float2*>(dst + col) =
              make_float2(acc[r >> 1][ot][2 * (r & 1)] * inv[r], acc[r >> 1][ot][2 * (r & 1) + 1] * inv[r]);
        }
      }
      if (t == 0) a.partial_lse[int64_t(split) * a.rows + index] = lse[r];
    }
    return;
  }

  // Stage the warp's rows as T in its own Q rows, then write them out a 16-byte chunk a lane.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = warp_row0 + (r >> 1) * 16 + (r & 1) * 8 + g;
#pragma unroll
    for (int ot = 0; ot < kOTiles; ++ot) {
      const uint32_t word =
          pack_pair<T>(acc[r >> 1][ot][2 * (r & 1)] * inv[r], acc[r >> 1][ot][2 * (r & 1) + 1] * inv[r]);
      st_shared_u32(smem_q + Layout::offset(row, ot) + 4 * t, word);
    }
  }
  __syncwarp();
  uint16_t* out_base = static_cast<uint16_t*>(a.out) + int64_t(b) * a.out_strides[0] +
                      int64_t(rows_of.q_start) * a.out_strides[2];
#pragma unroll
  for (int step = 0; step < kWarpRows * kChunks / 32; ++step) {
    const int idx = lane + step * 32;
    const int row = warp_row0 + idx / kChunks;
    const int c = idx % kChunks;
    if (row >= rows_valid || c >= d_chunks) continue;
    const RowCoords rc = row_coords(a, rows_of.len_q, head0, m0 + row);
    uint16_t* dst = out_base + int64_t(rc.h) * a.out_strides[1] + int64_t(rc.i) * a.out_strides[2] + c * 8;
    const uint4 value = ld_shared_v4(smem_q + Layout::offset(row, c));
    if (a.vec_out) {
      *reinterpret_cast<uint4*>(dst) = value;
    } else {
      const uint32_t w[4] = {value.x, value.y, value.z, value.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        dst[2 * i] = static_cast<uint16_t>(w[i] & 0xffffu);
        dst[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
      }
    }
  }
  if (t == 0 && a.lse != nullptr) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp_row0 + (r >> 1) * 16 + (r & 1) * 8 + g;
      if (row >= rows_valid) continue;
      const RowCoords rc = row_coords(a, rows_of.len_q, head0, m0 + row);
      a.lse[lse_index(a.cu_seqlens_q != nullptr, b, rc.h, rows_of.q_start, rc.i, a.heads_q, a.seq_q, a.total_q)] =
          lse[r];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Split-KV combine: one warp a padded row (b, h, i); rows i >= len_q of a packed sequence skip.
//   out = sum_s w_s O_s / sum_s w_s,  w_s = exp(lse_s - max lse),  lse = max + log(sum_s w_s)
// Splits that saw no key (lse_s = -inf) weigh nothing; a row no split saw gets zeros and +inf.
// ------------------------------------------------------------------------------------------------

constexpr int kCombineWarps = 4;

template <typename T>
__global__ void __launch_bounds__(32 * kCombineWarps) attention_combine_kernel(const ForwardArgs a) {
  const int64_t row = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (row >= a.rows) return;  // the whole warp leaves together
  const int i = static_cast<int>(row % a.seq_q);
  const int64_t bh = row / a.seq_q;
  const int h = static_cast<int>(bh % a.heads_q);
  const int b = static_cast<int>(bh / a.heads_q);
  const Sequence seq = sequence_of(a, b);
  if (i >= seq.len_q) return;  // no such row (packed layout): no split wrote it
  const float* part_lse = a.partial_lse + row;

  float mx = -INFINITY;
  for (int s = lane; s < a.splits; s += 32) mx = fmaxf(mx, part_lse[int64_t(s) * a.rows]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
  float total = 0.f;
  if (mx != -INFINITY) {
    for (int s = lane; s < a.splits; s += 32) total += expf(part_lse[int64_t(s) * a.rows] - mx);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(kFullMask, total, o);
  }
  const float inv = mx == -INFINITY ? 0.f : 1.f / total;

  T* dst = static_cast<T*>(a.out) + int64_t(b) * a.out_strides[0] + int64_t(h) * a.out_strides[1] +
           int64_t(seq.q_start + i) * a.out_strides[2];
  for (int d = 2 * lane; d < a.head_dim; d += 64) {
    float o0 = 0.f, o1 = 0.f;
    if (mx != -INFINITY) {
      for (int s = 0; s < a.splits; ++s) {
        const float l = part_lse[int64_t(s) * a.rows];
        if (l == -INFINITY) continue;
        const float w = expf(l - mx);
        const float2 o = *reinterpret_cast<const float2*>(a.partial_out + (int64_t(s) * a.rows + row) * a.head_dim + d);
        o0 += w * o.x;
        o1 += w * o.y;
      }
    }
    if constexpr (std::is_same_v<T, __half>) {
      dst[d] = __float2half_rn(o0 * inv);
      dst[d + 1] = __float2half_rn(o1 * inv);
    } else {
      dst[d] = __float2bfloat16_rn(o0 * inv);
      dst[d + 1] = __float2bfloat16_rn(o1 * inv);
    }
  }
  if (lane == 0 && a.lse != nullptr) {
    a.lse[lse_index(a.cu_seqlens_q != nullptr, b, h, seq.q_start, i, a.heads_q, a.seq_q, a.total_q)] =
        mx == -INFINITY ? INFINITY : mx + logf(total);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: plan and dispatch
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile sizes of a head_dim bucket; must match the instantiations of dispatch_head_dim. With a
// mask, the 32 and 64 buckets take 64-row tiles (the mask loads need the registers of the
// second row-block).
struct KernelShape {
  int d = 64;
  int block_m = 128;
  int block_n = 64;
};

KernelShape kernel_shape(int64_t head_dim, bool masked) {
  if (head_dim <= 32) return {32, masked ? 64 : 128, 64};
  if (head_dim <= 64) return {64, masked ? 64 : 128, 64};
  if (head_dim <= 96) return {96, 64, 64};
  if (head_dim <= 128) return {128, 64, 64};
  if (head_dim <= 192) return {192, 64, 32};
  return {256, 64, 32};
}

int64_t shape_smem_bytes(const KernelShape& s) {
  const int chunks = s.d / 8;
  const int64_t row_bytes = int64_t(chunks % 8 == 0 ? s.d : s.d + 8) * 2;
  return (s.block_m + 4 * int64_t(s.block_n)) * row_bytes;
}

constexpr int64_t kDecodeMaxSeqQ = 16;
constexpr int64_t kMaxSplits = 128;
constexpr int64_t kMinTilesPerSplit = 2;

struct Plan {
  KernelShape shape;
  bool gqa_rows = false;
  int64_t heads_grid = 0;
  int64_t m_tiles = 0;
  int64_t window = 0;     // clamped
  int64_t splits = 1;
};

bool launchable(const AttentionParams& p) {
  return attention_forward_unsupported(p)[0] == '\0' && p.batch > 0 && p.heads_q > 0 && p.heads_kv > 0 &&
         p.heads_q % p.heads_kv == 0 && p.seq_q > 0 && p.seq_kv >= 0;
}

Plan plan_forward(const AttentionParams& p) {
  Plan plan;
  plan.shape = kernel_shape(p.head_dim, p.mask != nullptr && p.mask_kind != MaskKind::none);
  const int64_t group = p.heads_q / p.heads_kv;
  const bool decode = p.seq_q <= kDecodeMaxSeqQ;
  plan.gqa_rows = decode && group > 1;
  plan.heads_grid = plan.gqa_rows ? p.heads_kv : p.heads_q;
  plan.m_tiles = ceil_div(plan.gqa_rows ? group * p.seq_q : p.seq_q, plan.shape.block_m);
  plan.window = p.window > 0 ? std::min<int64_t>(p.window, p.seq_q + p.seq_kv + 1) : 0;
  if (!decode || p.seq_kv == 0) return plan;

  // Key tiles the rows 0 .. seq_q - 1 of a sequence of the largest lengths see (each CTA splits
  // its own tiles; this only sizes `splits`).
  const int64_t offset = p.seq_kv - p.seq_q;
  int64_t j_lo = 0, j_hi = p.seq_kv;
  if (plan.window > 0) {
    j_lo = std::max<int64_t>(0, offset - plan.window + 1);
    j_hi = std::min(j_hi, p.seq_q - 1 + offset + plan.window);
  }
  if (p.causal) j_hi = std::min(j_hi, p.seq_q + offset);
  if (j_hi <= j_lo) return plan;
  const int64_t tiles = ceil_div(j_hi, plan.shape.block_n) - j_lo / plan.shape.block_n;

  const DeviceLimits limits = device_limits();
  const int64_t ctas = p.batch * plan.heads_grid * plan.m_tiles;
  // Resident CTAs an SM: by shared memory (1 KB a CTA reserved), and at most 2 by registers
  // (the kernels use 160 to 255 registers a thread).
  const int64_t ctas_per_sm =
      std::clamp<int64_t>(limits.smem_per_sm / (shape_smem_bytes(plan.shape) + 1024), 1, 2);
  const int64_t slots = int64_t(limits.sm_count) * ctas_per_sm;
  if (2 * ctas > slots) return plan;
  int64_t splits = std::min({ceil_div(slots, ctas), tiles / kMinTilesPerSplit, kMaxSplits});
  if (splits < 2) return plan;
  splits = ceil_div(tiles, ceil_div(tiles, splits));  // no empty split at these lengths
  if (splits < 2) return plan;
  plan.splits = splits;
  return plan;
}

bool is_aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Rows of 8-element chunks start 16-byte aligned (a stride of a size-1 dimension is never used;
// `rows` counts the rows along strides[2]: total_* in the packed layout).
bool rows_aligned(const void* ptr, const int64_t (&strides)[3], int64_t batch, int64_t heads, int64_t rows) {
  const int64_t sizes[3] = {batch, heads, rows};
  for (int d = 0; d < 3; ++d) {
    if (sizes[d] > 1 && strides[d] % 8 != 0) return false;
  }
  return is_aligned16(ptr);
}

ForwardArgs make_args(const AttentionParams& p, const Plan& plan, float* workspace) {
  ForwardArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.lse = p.lse;
  a.mask = p.mask;
  const bool varlen = p.cu_seqlens_q != nullptr;
  a.cu_seqlens_q = p.cu_seqlens_q;
  a.cu_seqlens_k = p.cu_seqlens_k;
  for (int d = 0; d < 3; ++d) {
    a.q_strides[d] = p.q_strides[d];
    a.k_strides[d] = p.k_strides[d];
    a.v_strides[d] = p.v_strides[d];
    a.out_strides[d] = p.out_strides[d];
  }
  for (int d = 0; d < 4; ++d) a.mask_strides[d] = p.mask_strides[d];
  a.rows = p.batch * p.heads_q * p.seq_q;
  a.batch = static_cast<int>(p.batch);
  a.heads_q = static_cast<int>(p.heads_q);
  a.group = static_cast<int>(p.heads_q / p.heads_kv);
  a.seq_q = static_cast<int>(p.seq_q);
  a.seq_kv = static_cast<int>(p.seq_kv);
  a.total_q = static_cast<int>(varlen ? p.total_q : p.seq_q);
  a.total_kv = static_cast<int>(varlen ? p.total_kv : p.seq_kv);
  a.head_dim = static_cast<int>(p.head_dim);
  a.heads_grid = static_cast<int>(plan.heads_grid);
  a.m_tiles = static_cast<int>(plan.m_tiles);
  a.splits = static_cast<int>(plan.splits);
  if (plan.splits > 1) {
    a.partial_out = workspace;
    a.partial_lse = workspace + plan.splits * a.rows * p.head_dim;
  }
  a.window = static_cast<int>(plan.window);
  a.mask_type = kMaskNone;
  if (p.mask == nullptr || p.mask_kind == MaskKind::none) {
    a.mask = nullptr;
  } else if (p.mask_kind == MaskKind::boolean) {
    a.mask_type = kMaskBool;
  } else {
    a.mask_type = p.mask_dtype == DType::f16 ? kMaskF16 : p.mask_dtype == DType::bf16 ? kMaskBF16 : kMaskF32;
  }
  a.has_softcap = p.softcap > 0.f;
  a.scale_log2 = p.scale * kLog2e;
  a.softcap_log2 = a.has_softcap ? p.softcap * kLog2e : 0.f;
  a.scale_over_softcap = a.has_softcap ? p.scale / p.softcap : 0.f;
  a.causal = p.causal;
  a.gqa_rows = plan.gqa_rows;
  a.vec_in = rows_aligned(p.q, p.q_strides, p.batch, p.heads_q, a.total_q) &&
             rows_aligned(p.k, p.k_strides, p.batch, p.heads_kv, a.total_kv) &&
             rows_aligned(p.v, p.v_strides, p.batch, p.heads_kv, a.total_kv);
  a.vec_out = rows_aligned(p.out, p.out_strides, p.batch, p.heads_q, a.total_q);
  return a;
}

template <typename T, int kD, int kBlockM, int kBlockN, bool kQInRegs, bool kMasked>
void launch_forward(ForwardArgs args, int64_t blocks, cudaStream_t stream) {
  constexpr int kSmem = forward_smem_bytes<kD, kBlockM, kBlockN>();
  auto kernel = attention_forward_kernel<T, kD, kBlockM, kBlockN, kQInRegs, kMasked>;
  if constexpr (kSmem > 48 * 1024) {
    // The opt-in above 48 KB is per device; set once for each (devices 0..63; others every call).
    static std::atomic<uint64_t> configured{0};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) device = 0;
    const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
    if (bit == 0 || (configured.load(std::memory_order_acquire) & bit) == 0) {
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess) {
        return;  // the error stays for the caller's cudaGetLastError
      }
      configured.fetch_or(bit, std::memory_order_release);
    }
  }
  constexpr int64_t kMaxGrid = 2147483647;
  for (int64_t first = 0; first < blocks; first += kMaxGrid) {
    args.block_offset = first;
    const unsigned grid = static_cast<unsigned>(std::min(kMaxGrid, blocks - first));
    kernel<<<grid, kThreads, kSmem, stream>>>(args);
  }
}

// The instantiations; kernel_shape gives the same tile sizes.
template <typename T, bool kMasked>
void dispatch_head_dim(const ForwardArgs& args, const KernelShape& shape, int64_t blocks, cudaStream_t stream) {
  constexpr int kSmallM = kMasked ? 64 : 128;
  switch (shape.d) {
    case 32: launch_forward<T, 32, kSmallM, 64, true, kMasked>(args, blocks, stream); break;
    case 64: launch_forward<T, 64, kSmallM, 64, true, kMasked>(args, blocks, stream); break;
    case 96: launch_forward<T, 96, 64, 64, true, kMasked>(args, blocks, stream); break;
    case 128: launch_forward<T, 128, 64, 64, true, kMasked>(args, blocks, stream); break;
    case 192: launch_forward<T, 192, 64, 32, true, kMasked>(args, blocks, stream); break;
    default: launch_forward<T, 256, 64, 32, false, kMasked>(args, blocks, stream); break;
  }
}

template <typename T>
void launch_all(const AttentionParams& p, float* workspace, cudaStream_t stream) {
  const Plan plan = plan_forward(p);
  const ForwardArgs args = make_args(p, plan, workspace);
  const int64_t blocks = plan.m_tiles * plan.splits * plan.heads_grid * p.batch;
  if (args.mask_type != kMaskNone) {
    dispatch_head_dim<T, true>(args, plan.shape, blocks, stream);
  } else {
    dispatch_head_dim<T, false>(args, plan.shape, blocks, stream);
  }
  if (plan.splits > 1) {
    const unsigned grid = static_cast<unsigned>(ceil_div(args.rows, kCombineWarps));
    attention_combine_kernel<T><<<grid, 32 * kCombineWarps, 0, stream>>>(args);
  }
}

}  // namespace

const char* attention_forward_unsupported(const AttentionParams& p) {
  if (p.dtype != DType::f16 && p.dtype != DType::bf16) {
    return "the CUDA attention kernel takes float16 and bfloat16";
  }
  if (p.head_dim % 8 != 0) return "the CUDA attention kernel takes head_dim a multiple of 8";
  if (p.head_dim > 256) return "the CUDA attention kernel takes head_dim up to 256";
  if (p.dropout_p != 0.f) return "dropout runs on the Triton kernel";
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) {
    return "the packed layout needs both cu_seqlens_q and cu_seqlens_k";
  }
  return "";
}

int64_t attention_forward_workspace_floats(const AttentionParams& p) {
  if (!launchable(p)) return 0;
  const Plan plan = plan_forward(p);
  if (plan.splits <= 1) return 0;
  return plan.splits * p.batch * p.heads_q * p.seq_q * (p.head_dim + 1);
}

void attention_forward_launch(const AttentionParams& p, float* workspace, cudaStream_t stream) {
  if (!launchable(p)) return;
  if (p.dtype == DType::f16) {
    launch_all<__half>(p, workspace, stream);
  } else {
    launch_all<__nv_bfloat16>(p, workspace, stream);
  }
}

}  // namespace transfuse::cuda
