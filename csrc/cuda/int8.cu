// CUDA kernels of the int8 quantized matmul. The math is stated in common/int8.h.
//
// quantize_per_token_kernel   a group of threads a row (a warp for short rows, up to a block for
//                             long ones): absmax, then the scale, then q, reading x twice (the
//                             second pass mostly from L1/L2), 16 bytes of x at a time where aligned.
//
// int8_gemm_kernel (w8a8)     acc = x_q w^T on int8 tensor cores, mma.sync.m16n8k32 s8 x s8 -> s32
//                             (sm_80+), then out = acc * s_x * s_w + bias in fp32 (or acc itself).
//   Both operands are k-major (x_q [m, k] row-major, w [n, k] row-major: the "row.col" of mma),
//   so one ldmatrix (8 rows of 16 bytes = 8 x 16 int8) yields exactly one A or B register of the
//   s8 fragment: thread (g = lane / 4, t = lane % 4) gets bytes 4t .. 4t + 3 of row g.
//   Tiles (CTA m x n x k bytes, warps m x n, stages, dynamic shared memory):
//     large  128 x 128 x  64, 2 x 4 warps (warp tile 64 x 32), 4 stages, 64 KB
//     small   32 x  64 x 128, 1 x 4 warps (warp tile 32 x 16), 4 stages, 48 KB
//   The large tile is used when m > 64 and its CTAs fill the GPU, else the small one (decoding and
//   small n: more CTAs, and 4 stages of 128-byte rows keep 32 KB of w in flight per CTA).
//   Shared memory: per stage the A tile [BM rows] then the B tile [BN rows], rows of BK bytes cut
//   into 16-byte chunks; the chunk index is XOR-swizzled (128-byte rows: with row % 8; 64-byte
//   rows: with (row / 2) % 4, two rows sharing a 128-byte line), so the 8 rows an ldmatrix phase
//   reads and the 8 chunks a cp.async phase writes fall in 8 distinct 16-byte bank groups.
//   Pipeline: kStages - 1 k-tiles are in flight; iteration kt waits for tile kt
//   (cp.async.wait_group kStages - 2), syncs (which also frees the stage read in iteration kt - 1),
//   issues tile kt + kStages - 1 into that stage and computes on tile kt.
//   Loads: rows of x_q and w 16-byte aligned (k % 16 == 0, aligned pointers): cp.async of 16 bytes,
//   with src-size 0 (zero fill, nothing read) for rows past m / n and chunks past k. Otherwise
//   every chunk is gathered by byte loads predicated on k and stored to shared memory (same layout,
//   same pipeline; slower, but never reads out of bounds).
//   Epilogue from the accumulator fragments: pairs of columns (2t, 2t + 1) stored as one 8-byte
//   (fp32 / int32) or 4-byte (16-bit) store where n is even and out aligned, scalars otherwise.
//   Grid: one dimension, the tiles ordered in groups of 8 row-tiles so that the CTAs running at
//   once share their w tiles in L2.
//
// w8a16_gemv_kernel (m <= 16) out = (x w^T) * s_w + bias with fp32 accumulation on CUDA cores;
//   w is streamed once with 16-byte loads (see the kernel), x is read from L1/L2. Deterministic:
//   the k-split over the warps of a block is summed in a fixed order in shared memory.
// w8a16_tiled_kernel (m > 16) the same math, 64 x 64 outputs a block, x and w converted to fp32
//   tiles in shared memory; a plain correct kernel (the Python layer sends w8a16 with m > 16 to
//   Triton on GPU).
//
// Exactness. int8 -> fp32 is exact, so w8a16 differs from the fp32 reference only by the order of
// the fp32 sums. The epilogues use __fmul_rn / __fadd_rn (no contraction into an FMA), in the order
// of common/int8.h: float(acc) * s_x, then * s_w, then + bias, then one rounding to the out dtype.

#include "int8.h"

#include "device.h"
#include "element.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace transfuse::cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Element types
// ------------------------------------------------------------------------------------------------

// The elements of T packed in a 32-bit word (one float, or two 16-bit values, low half first).
template <typename T>
__device__ __forceinline__ void word_to_floats(uint32_t word, float* values) {
  if constexpr (std::is_same_v<T, float>) {
    values[0] = __uint_as_float(word);
  } else if constexpr (std::is_same_v<T, __half>) {
    values[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
    values[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
  } else {
    values[0] = __uint_as_float(word << 16);
    values[1] = __uint_as_float(word & 0xffff0000u);
  }
}

// kWords 32-bit words from ptr in one or more vector loads through the read-only path
// (ptr aligned to min(4 * kWords, 16) bytes).
template <int kWords>
__device__ __forceinline__ void load_words(const void* ptr, uint32_t (&words)[kWords]) {
  if constexpr (kWords >= 4) {
    static_assert(kWords % 4 == 0, "whole 16-byte vectors");
#pragma unroll
    for (int v = 0; v < kWords / 4; ++v) {
      const uint4 value = __ldg(static_cast<const uint4*>(ptr) + v);
      words[4 * v + 0] = value.x;
      words[4 * v + 1] = value.y;
      words[4 * v + 2] = value.z;
      words[4 * v + 3] = value.w;
    }
  } else if constexpr (kWords == 2) {
    const uint2 value = __ldg(static_cast<const uint2*>(ptr));
    words[0] = value.x;
    words[1] = value.y;
  } else {
    words[0] = __ldg(static_cast<const unsigned int*>(ptr));
  }
}

// kN consecutive elements from ptr as floats; those at or past `valid` (which may be <= 0) read
// as 0 without being touched. One vector access when `vector` and all kN are valid (ptr is then
// aligned to the vector: kN * sizeof(T) bytes, at most 16), scalar loads otherwise.
template <typename T, int kN>
__device__ __forceinline__ void load_floats(const T* ptr, int64_t valid, bool vector, float (&values)[kN]) {
  constexpr int kBytes = kN * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 4 == 0) {
    if (vector && valid >= kN) {
      constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
      uint32_t words[kBytes / 4];
      load_words<kBytes / 4>(ptr, words);
#pragma unroll
      for (int w = 0; w < kBytes / 4; ++w) word_to_floats<T>(words[w], values + w * kPerWord);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kN; ++i) values[i] = i < valid ? to_float<T>(ptr[i]) : 0.f;
}

// kBytes bytes of an int8 row as words (little-endian, byte 0 in the low bits of word 0); bytes
// at or past `valid` (which may be <= 0) are 0 and not read. One vector load (kBytes 8 or 16,
// ptr aligned to it) when `vector` and all are valid; kStreaming marks it read-once (evict first).
template <int kBytes, bool kStreaming>
__device__ __forceinline__ void load_int8(const int8_t* ptr, int64_t valid, bool vector,
                                          uint32_t (&words)[kBytes / 4]) {
  static_assert(kBytes == 8 || kBytes == 16, "8 or 16 bytes");
  if (vector && valid >= kBytes) {
    if constexpr (kBytes == 16) {
      const uint4 v = kStreaming ? __ldcs(reinterpret_cast<const uint4*>(ptr))
                                 : __ldg(reinterpret_cast<const uint4*>(ptr));
      words[0] = v.x;
      words[1] = v.y;
      words[2] = v.z;
      words[3] = v.w;
    } else {
      const uint2 v = kStreaming ? __ldcs(reinterpret_cast<const uint2*>(ptr))
                                 : __ldg(reinterpret_cast<const uint2*>(ptr));
      words[0] = v.x;
      words[1] = v.y;
    }
    return;
  }
#pragma unroll
  for (int w = 0; w < kBytes / 4; ++w) words[w] = 0u;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(ptr);
#pragma unroll
  for (int b = 0; b < kBytes; ++b) {
    if (b < valid) words[b / 4] |= static_cast<uint32_t>(bytes[b]) << (8 * (b % 4));
  }
}

// The four int8 of `word` as exact floats. Each byte b, offset to b + 128 in [0, 255], becomes the
// low mantissa byte of 2^23 (0x4B0000xx), a float equal to 2^23 + 128 + b; one subtraction then
// gives b exactly. A byte permute and an add instead of a (quarter-rate) int -> float conversion.
__device__ __forceinline__ void int8x4_to_floats(uint32_t word, float (&values)[4]) {
  const uint32_t biased = word ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    values[i] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7650u + i)) - 8388736.f;  // 2^23 + 128
  }
}

// Element `index` of a tensor of dtype, as float.
__device__ __forceinline__ float load_as_float(const void* base, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::f16: return __half2float(static_cast<const __half*>(base)[index]);
    case DType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
    default: return static_cast<const float*>(base)[index];
  }
}

// Elements index, index + 1 of out (the second only when `both`): one 8- or 4-byte store when
// `both` and `pair` (index even, out aligned to two elements), scalar stores otherwise.
template <typename T>
__device__ __forceinline__ void store_pair(T* out, int64_t index, float v0, float v1, bool both, bool pair) {
  if (both && pair) {
    if constexpr (std::is_same_v<T, float>) {
      *reinterpret_cast<float2*>(out + index) = make_float2(v0, v1);
    } else {
      uint32_t word;
      if constexpr (std::is_same_v<T, __half>) {
        const __half2 packed = __floats2half2_rn(v0, v1);
        memcpy(&word, &packed, sizeof(word));
      } else {
        const __nv_bfloat162 packed = __floats2bfloat162_rn(v0, v1);
        memcpy(&word, &packed, sizeof(word));
      }
      *reinterpret_cast<uint32_t*>(out + index) = word;
    }
    return;
  }
  out[index] = from_float<T>(v0);
  if (both) out[index + 1] = from_float<T>(v1);
}

__device__ __forceinline__ void store_pair(void* out, DType dtype, int64_t index, float v0, float v1,
                                           bool both, bool pair) {
  switch (dtype) {
    case DType::f16: store_pair(static_cast<__half*>(out), index, v0, v1, both, pair); break;
    case DType::bf16: store_pair(static_cast<__nv_bfloat16*>(out), index, v0, v1, both, pair); break;
    default: store_pair(static_cast<float*>(out), index, v0, v1, both, pair); break;
  }
}

// The w8a8 epilogue in the order of common/int8.h, each step rounded (no FMA contraction).
__device__ __forceinline__ float dequantize(int acc, float x_scale, float w_scale, float bias, bool has_bias) {
  const float scaled = __fmul_rn(__fmul_rn(__int2float_rn(acc), x_scale), w_scale);
  return has_bias ? __fadd_rn(scaled, bias) : scaled;
}

// The w8a16 epilogue: sum * s_w + bias, each step rounded.
__device__ __forceinline__ float scale_and_bias(float sum, float w_scale, float bias, bool has_bias) {
  const float scaled = __fmul_rn(sum, w_scale);
  return has_bias ? __fadd_rn(scaled, bias) : scaled;
}

constexpr unsigned kFullMask = 0xffffffffu;

// Butterfly sum over a warp: every lane ends with the same bits.
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// ------------------------------------------------------------------------------------------------
// PTX wrappers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared, of which the first src_bytes (0 or 16) are read and the rest zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void st_shared_v4(uint32_t dst, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(a), "r"(b), "r"(c), "r"(d)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t src) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(src));
}

// d += a b: a 16 x 32 int8 (row-major fragment), b 32 x 8 int8 (column-major), d 16 x 8 int32.
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------------------
// Per-token quantization
// ------------------------------------------------------------------------------------------------

// q = clamp(rint(x / scale), -127, 127): IEEE division, round half to even (as torch.round).
// Clamping the int equals clamping the float first: every int past +-127 comes from a float past it.
__device__ __forceinline__ int quantize_value(float x, float scale) {
  return min(max(__float2int_rn(__fdiv_rn(x, scale)), -127), 127);
}

// The max of `value` over the blockDim.x threads of this thread's row group (threadIdx.y), in
// every thread of the group. With blockDim.x > 32 every thread of the block must call it.
__device__ __forceinline__ unsigned row_max(unsigned value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = max(value, __shfl_xor_sync(kFullMask, value, offset));
  if (blockDim.x == 32) return value;

  __shared__ unsigned warp_max[32];  // a block has at most 32 warps
  const int warps_per_row = static_cast<int>(blockDim.x) / 32;
  const int first_warp = static_cast<int>(threadIdx.y) * warps_per_row;
  __syncthreads();  // the previous call's readers are done with warp_max
  if (threadIdx.x % 32 == 0) warp_max[first_warp + static_cast<int>(threadIdx.x) / 32] = value;
  __syncthreads();
  for (int w = 0; w < warps_per_row; ++w) value = max(value, warp_max[first_warp + w]);
  return value;
}

// kVec int8 values to q (aligned to kVec bytes): one 8-, 4- or 1-byte store.
template <int kVec>
__device__ __forceinline__ void store_q(int8_t* q, const int (&values)[kVec]) {
  if constexpr (kVec == 1) {
    *q = static_cast<int8_t>(values[0]);
  } else {
    uint32_t words[kVec / 4];
#pragma unroll
    for (int w = 0; w < kVec / 4; ++w) {
      words[w] = 0u;
#pragma unroll
      for (int b = 0; b < 4; ++b) words[w] |= (static_cast<uint32_t>(values[4 * w + b]) & 0xffu) << (8 * b);
    }
    if constexpr (kVec == 8) {
      *reinterpret_cast<uint2*>(q) = make_uint2(words[0], words[1]);
    } else {
      *reinterpret_cast<uint32_t*>(q) = words[0];
    }
  }
}

// Per row i of x [rows, cols]:
//   absmax = max_k |x[i, k]|, reduced on the bit patterns of |x| (the integer order of
//            non-negative floats, NaN above inf: fmaxf would skip a NaN)
//   scale  = absmax / 127, or 1 where that is 0; NaN where absmax is inf or NaN
//   q      = clamp(rint(x / scale), -127, 127); 0 where scale is NaN
// A row belongs to a group of blockDim.x threads (a multiple of 32), blockDim.y groups a block,
// rows grid-stride. Thread t of a group handles vectors t, t + blockDim.x, ... of kVec elements
// (kVec = 16 / sizeof(T): 16-byte loads, rows aligned; kVec = 1: any row). Pass 1 reduces absmax
// (warp shuffles, then shared memory across the warps of a group); pass 2 re-reads x to write q.
template <typename T, int kVec>
__global__ void __launch_bounds__(1024) quantize_per_token_kernel(const QuantizeParams p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t vectors = p.cols / kVec;
  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows;
       first_row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool row_valid = row < p.rows;
    const T* x_row = x + row * p.cols;

    unsigned absmax_bits = 0u;
    if (row_valid) {
      for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
        float values[kVec];
        load_floats<T, kVec>(x_row + v * kVec, kVec, true, values);
#pragma unroll
        for (int j = 0; j < kVec; ++j) absmax_bits = max(absmax_bits, __float_as_uint(values[j]) & 0x7fffffffu);
      }
    }
    absmax_bits = row_max(absmax_bits);  // every thread of the block takes part, valid row or not
    if (!row_valid) continue;

    const bool finite = absmax_bits < 0x7f800000u;
    const float quotient = __fdiv_rn(__uint_as_float(absmax_bits), 127.f);
    const float scale = !finite ? __uint_as_float(0x7fc00000u) : quotient == 0.f ? 1.f : quotient;
    if (threadIdx.x == 0) p.scale[row] = scale;
    int8_t* q_row = p.q + row * p.cols;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      float values[kVec];
      load_floats<T, kVec>(x_row + v * kVec, kVec, true, values);
      int q[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) q[j] = finite ? quantize_value(values[j], scale) : 0;
      store_q<kVec>(q_row + v * kVec, q);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// w8a8: int8 tensor-core GEMM with the dequantizing epilogue
// ------------------------------------------------------------------------------------------------

// Everything the GEMM needs, filled on the host (m, n, k <= 2^30; element offsets are int64).
struct GemmArgs {
  const int8_t* x_q;      // [m, k]
  const int8_t* w;        // [n, k]
  const float* x_scale;   // [m]
  const float* w_scale;   // [n]
  const void* bias;       // [n], dtype, or null
  void* out;              // [m, n], dtype (when acc is null)
  int32_t* acc;           // [m, n] or null: the raw product is written instead of out
  int m;
  int n;
  int k;
  int m_tiles;
  int n_tiles;
  DType dtype;
  bool cp_async;          // x_q and w rows 16-byte aligned: cp.async loads
  bool pair_store;        // n even and out (or acc) aligned to two elements
};

// A CTA tile: kBlockM x kBlockN outputs, k-tiles of kBlockK bytes, kWarpsM x kWarpsN warps,
// kStages shared-memory stages, at least kMinBlocks CTAs an SM (caps the registers).
template <int kBlockM_, int kBlockN_, int kBlockK_, int kWarpsM_, int kWarpsN_, int kStages_, int kMinBlocks_>
struct GemmTile {
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kBlockK = kBlockK_;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWarpM = kBlockM / kWarpsM;              // rows of a warp tile
  static constexpr int kWarpN = kBlockN / kWarpsN;              // columns of a warp tile
  static constexpr int kMTiles = kWarpM / 16;                   // mma row blocks of a warp
  static constexpr int kNTiles = kWarpN / 8;                    // mma column blocks of a warp
  static constexpr int kKSteps = kBlockK / 32;                  // mma k-steps of a k-tile
  static constexpr int kChunks = kBlockK / 16;                  // 16-byte chunks of a tile row
  static constexpr int kLoadRows = kThreads / kChunks;          // rows one pass of the loads covers
  static constexpr int kStageBytes = (kBlockM + kBlockN) * kBlockK;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kChunks == 4 || kChunks == 8, "64- or 128-byte rows (the swizzles of tile_offset)");
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tiles of whole mma blocks, n-tiles in pairs");
  static_assert(kLoadRows % 8 == 0, "a thread's rows share row % 8, hence the swizzle");
  static_assert(kBlockM % kLoadRows == 0 && kBlockN % kLoadRows == 0, "tiles split evenly over the threads");
  static_assert(kStages >= 2, "a pipeline");
};

using LargeTile = GemmTile<128, 128, 64, 2, 4, 4, 2>;
using SmallTile = GemmTile<32, 64, 128, 1, 4, 4, 4>;

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kChunks-chunk rows. 128-byte
// rows: chunk ^ (row % 8). 64-byte rows (two a 128-byte line): chunk ^ ((row / 2) % 4), so rows
// r .. r + 7 (r % 8 == 0) at one chunk lie in the 8 distinct 16-byte slots of a 128-byte window.
template <int kChunks>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  if constexpr (kChunks == 8) {
    return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
  } else {
    return static_cast<uint32_t>(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
  }
}

// One 16-byte chunk of a row, global -> shared at dst: `bytes` (0 to 16) bytes from base + offset,
// zeros after them. cp_async (bytes then 0 or 16, the source 16-byte aligned): cp.async, which
// reads nothing for bytes 0 (base is passed, a valid address); else predicated byte loads.
__device__ __forceinline__ void copy_chunk(uint32_t dst, const int8_t* base, int64_t offset, int bytes, bool cp_async) {
  if (cp_async) {
    cp_async_16(dst, bytes > 0 ? base + offset : base, bytes);
    return;
  }
  uint32_t words[4];
  load_int8<16, false>(base + (bytes > 0 ? offset : 0), bytes, false, words);
  st_shared_v4(dst, words[0], words[1], words[2], words[3]);
}

// acc[i, j] = sum_k x_q[i, k] w[j, k] in int32 on tensor cores, then out[i, j] =
// round_out(float(acc) * s_x[i] * s_w[j] + bias[j]), or acc itself when a.acc is set.
// The CTA owns a kBlockM x kBlockN tile of the output; warp (wm, wn) = (warp / kWarpsN,
// warp % kWarpsN) owns rows wm * kWarpM + [0, kWarpM) and columns wn * kWarpN + [0, kWarpN) as
// kMTiles x kNTiles mma blocks of 16 x 8, and per k-step of 32 loads its A fragments (one ldmatrix.x4
// a 16-row block: rows 0-7 / 8-15 x bytes 0-15 / 16-31) and B fragments (one ldmatrix.x4 a pair of
// 8-column blocks: columns 0-7 x bytes 0-15, 0-7 x 16-31, 8-15 x 0-15, 8-15 x 16-31).
template <typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) int8_gemm_kernel(const GemmArgs a) {
  constexpr int kBlockM = Tile::kBlockM;
  constexpr int kBlockN = Tile::kBlockN;
  constexpr int kBlockK = Tile::kBlockK;
  constexpr int kRowBytes = kBlockK;
  constexpr int kChunks = Tile::kChunks;
  constexpr int kMTiles = Tile::kMTiles;
  constexpr int kNTiles = Tile::kNTiles;
  constexpr int kKSteps = Tile::kKSteps;
  constexpr int kStages = Tile::kStages;
  constexpr int kLoadRows = Tile::kLoadRows;
  constexpr int kStageBytes = Tile::kStageBytes;
  constexpr int kGroupM = 8;  // row-tiles of a group of the tile order

  extern __shared__ uint4 smem[];
  const uint32_t smem_base = smem_address(smem);
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;  // mma row group
  const int t = lane & 3;   // thread in the group

  // ---- which tile: groups of kGroupM row-tiles, column-tile by column-tile within a group ----
  const int block = static_cast<int>(blockIdx.x);
  const int per_group = kGroupM * a.n_tiles;
  const int first_m = (block / per_group) * kGroupM;
  const int group_m = min(a.m_tiles - first_m, kGroupM);
  const int in_group = block % per_group;
  const int m0 = (first_m + in_group % group_m) * kBlockM;
  const int n0 = (in_group / group_m) * kBlockN;

  // ---- loads: thread tid copies chunk tid % kChunks of rows tid / kChunks + i * kLoadRows ----
  const int load_chunk = tid % kChunks;
  const int load_row = tid / kChunks;
  const uint32_t load_dst = tile_offset<kChunks>(load_row, load_chunk);
  auto load_tile = [&](int kt, int stage) {
    const int kc = kt * kBlockK + load_chunk * 16;
    const int chunk_bytes = min(max(a.k - kc, 0), 16);
    const uint32_t a_dst = smem_base + stage * kStageBytes + load_dst;
    const uint32_t b_dst = a_dst + kBlockM * kRowBytes;
#pragma unroll
    for (int i = 0; i < kBlockM / kLoadRows; ++i) {
      const int row = m0 + load_row + i * kLoadRows;
      copy_chunk(a_dst + i * kLoadRows * kRowBytes, a.x_q, int64_t(row) * a.k + kc, row < a.m ? chunk_bytes : 0,
                 a.cp_async);
    }
#pragma unroll
    for (int i = 0; i < kBlockN / kLoadRows; ++i) {
      const int col = n0 + load_row + i * kLoadRows;
      copy_chunk(b_dst + i * kLoadRows * kRowBytes, a.w, int64_t(col) * a.k + kc, col < a.n ? chunk_bytes : 0,
                 a.cp_async);
    }
  };

  // ---- ldmatrix addresses of this lane in a stage, per k-step (the swizzle depends on row % 8,
  // which the 16-row steps between mma blocks keep) ----
  //   A: lanes 0-15 rows 0-15 at chunk 2 ks, lanes 16-31 rows 0-15 at chunk 2 ks + 1
  //   B: lanes 0-7 columns 0-7 chunk 2 ks, 8-15 columns 0-7 chunk 2 ks + 1, 16-23 columns 8-15
  //      chunk 2 ks, 24-31 columns 8-15 chunk 2 ks + 1
  const int warp_m0 = (warp / Tile::kWarpsN) * Tile::kWarpM;
  const int warp_n0 = (warp % Tile::kWarpsN) * Tile::kWarpN;
  uint32_t a_lane[kKSteps];
  uint32_t b_lane[kKSteps];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    a_lane[ks] = tile_offset<kChunks>(warp_m0 + (lane & 15), 2 * ks + (lane >> 4));
    b_lane[ks] = kBlockM * kRowBytes +
                 tile_offset<kChunks>(warp_n0 + ((lane >> 4) << 3) + (lane & 7), 2 * ks + ((lane >> 3) & 1));
  }

  int acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0;
    }
  }

  // ---- main loop ----
  const int k_tiles = (a.k + kBlockK - 1) / kBlockK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();  // one group a tile, empty or not, so that the counts below hold
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // groups 0 .. kt (tiles 0 .. kt) of this thread have landed
    __syncthreads();               // ... of every thread; and the stage of tile kt - 1 is free
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_tile(next, next % kStages);
    cp_async_commit();

    const uint32_t stage = smem_base + (kt % kStages) * kStageBytes;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a_frag[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a_frag[mt], stage + a_lane[ks] + mt * 16 * kRowBytes);
      uint32_t b_frag[kNTiles / 2][4];  // b0, b1 of n-tile 2 np, then of n-tile 2 np + 1
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) ldmatrix_x4(b_frag[np], stage + b_lane[ks] + np * 16 * kRowBytes);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          mma_s8_16832(acc[mt][nt], a_frag[mt], b_frag[nt / 2][2 * (nt % 2)], b_frag[nt / 2][2 * (nt % 2) + 1]);
        }
      }
    }
  }

  // ---- epilogue: the thread holds rows g, g + 8 of each mma block, columns 2t, 2t + 1 ----
  if (a.acc != nullptr) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + warp_m0 + mt * 16 + h * 8 + g;
        if (row >= a.m) continue;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const int col = n0 + warp_n0 + nt * 8 + 2 * t;
          if (col >= a.n) continue;
          const int64_t index = int64_t(row) * a.n + col;
          const bool both = col + 1 < a.n;
          if (both && a.pair_store) {
            *reinterpret_cast<int2*>(a.acc + index) = make_int2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
          } else {
            a.acc[index] = acc[mt][nt][2 * h];
            if (both) a.acc[index + 1] = acc[mt][nt][2 * h + 1];
          }
        }
      }
    }
    return;
  }

  const bool has_bias = a.bias != nullptr;
  float w_scale[kNTiles][2];
  float bias[kNTiles][2];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = n0 + warp_n0 + nt * 8 + 2 * t + e;
      const bool valid = col < a.n;
      w_scale[nt][e] = valid ? a.w_scale[col] : 0.f;
      bias[nt][e] = valid && has_bias ? load_as_float(a.bias, a.dtype, col) : 0.f;
    }
  }
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_m0 + mt * 16 + h * 8 + g;
      if (row >= a.m) continue;
      const float x_scale = a.x_scale[row];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const int col = n0 + warp_n0 + nt * 8 + 2 * t;
        if (col >= a.n) continue;
        const float v0 = dequantize(acc[mt][nt][2 * h], x_scale, w_scale[nt][0], bias[nt][0], has_bias);
        const float v1 = dequantize(acc[mt][nt][2 * h + 1], x_scale, w_scale[nt][1], bias[nt][1], has_bias);
        store_pair(a.out, a.dtype, int64_t(row) * a.n + col, v0, v1, col + 1 < a.n, a.pair_store);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// w8a16: weight-only int8
// ------------------------------------------------------------------------------------------------

struct WeightOnlyArgs {
  const void* x;          // [m, k], dtype
  const int8_t* w;        // [n, k]
  const float* w_scale;   // [n]
  const void* bias;       // [n], dtype, or null
  void* out;              // [m, n], dtype
  int m;
  int n;
  int k;
  int n_tiles;            // tiled kernel: column tiles of the grid
  int k_split;            // GEMV: warps sharing a group of columns (1, 2, 4 or 8)
  bool x_vector;          // x rows 16-byte aligned: vector loads
  bool w_vector;          // w rows aligned to the kernel's load (GEMV 16 bytes, tiled 8)
};

constexpr int kGemvWarps = 8;

// Weight rows a warp of the GEMV streams side by side: 4, or 2 with 8 x rows (registers).
template <int kRows>
constexpr int gemv_cols() {
  return kRows >= 8 ? 2 : 4;
}

// out[i, j] = round_out((sum_k x[i, k] * w[j, k]) * s_w[j] + bias[j]) for m <= 16 (decoding).
// A block of 8 warps owns rows kRows * blockIdx.y + [0, kRows) (kRows in {1, 2, 4, 8}; rows past m
// are skipped) and 8 / k_split groups of kCols columns (4; 2 when kRows is 8); the k_split warps of
// a group (part = warp % k_split) split its k range. Lane l handles the 16-element chunks
// part * 32 + l + j * 32 * k_split: per chunk one 16-byte streaming load of each of its kCols
// weight rows (a warp reads 512 contiguous bytes of a row; the next chunk's loads are issued before
// this one is used), converted exactly to fp32 4 bytes at a time, and 4 elements of each x row at a
// time (read-only loads that L1 serves to every warp), accumulated by fp32 FMAs into kRows x kCols sums.
// Then each sum is reduced over the warp (butterfly) and over the k_split warps in order through
// shared memory; lane r * kCols + c of the group's first warp writes out[row r, column c].
template <typename TX, int kRows>
__global__ void __launch_bounds__(32 * kGemvWarps, 2) w8a16_gemv_kernel(const WeightOnlyArgs a) {
  constexpr int kCols = gemv_cols<kRows>();
  static_assert(kRows * kCols <= 32, "a lane writes each output");
  __shared__ float partials[kGemvWarps][kRows * kCols];

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int group = warp / a.k_split;
  const int part = warp % a.k_split;
  const int64_t col0 = (int64_t(blockIdx.x) * (kGemvWarps / a.k_split) + group) * kCols;
  const int row0 = static_cast<int>(blockIdx.y) * kRows;
  const TX* x = static_cast<const TX*>(a.x);

  const int8_t* w_row[kCols];
  bool col_valid[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    col_valid[c] = col0 + c < a.n;
    w_row[c] = a.w + (col_valid[c] ? col0 + c : 0) * a.k;
  }

  float acc[kRows][kCols];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  }

  const int64_t chunks = (int64_t(a.k) + 15) / 16;
  const int64_t stride = int64_t(a.k_split) * 32;
  auto load_w = [&](int64_t chunk, uint32_t (&words)[kCols][4]) {
    const int64_t kc = chunk * 16;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      load_int8<16, true>(w_row[c] + kc, col_valid[c] ? a.k - kc : 0, a.w_vector, words[c]);
    }
  };

  int64_t chunk = int64_t(part) * 32 + lane;
  uint32_t w_next[kCols][4];
  if (chunk < chunks) load_w(chunk, w_next);
  for (; chunk < chunks; chunk += stride) {
    uint32_t w_words[kCols][4];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
#pragma unroll
      for (int i = 0; i < 4; ++i) w_words[c][i] = w_next[c][i];
    }
    if (chunk + stride < chunks) load_w(chunk + stride, w_next);

    const int64_t kc = chunk * 16;
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // elements kc + 4q .. kc + 4q + 3
      float w_float[kCols][4];
#pragma unroll
      for (int c = 0; c < kCols; ++c) int8x4_to_floats(w_words[c][q], w_float[c]);
      const int64_t k_at = kc + 4 * q;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = row0 + r;
        if (row >= a.m) break;  // the same for the whole block
        float x_float[4];
        load_floats<TX, 4>(x + int64_t(row) * a.k + k_at, a.k - k_at, a.x_vector, x_float);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
#pragma unroll
          for (int c = 0; c < kCols; ++c) acc[r][c] = fmaf(x_float[e], w_float[c][e], acc[r][c]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = warp_sum(acc[r][c]);
  }
  if (a.k_split > 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) partials[warp][r * kCols + c] = acc[r][c];
      }
    }
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        float sum = partials[warp][r * kCols + c];
        for (int s = 1; s < a.k_split; ++s) sum += partials[warp + s][r * kCols + c];
        acc[r][c] = sum;
      }
    }
  }

  TX* out = static_cast<TX*>(a.out);
  const TX* bias = static_cast<const TX*>(a.bias);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if (lane != r * kCols + c) continue;
      const int row = row0 + r;
      const int64_t col = col0 + c;
      if (row >= a.m || col >= a.n) continue;
      const float b = bias != nullptr ? to_float<TX>(bias[col]) : 0.f;
      out[int64_t(row) * a.n + col] = from_float<TX>(scale_and_bias(acc[r][c], a.w_scale[col], b, bias != nullptr));
    }
  }
}

constexpr int kTiledBlock = 64;   // outputs a block: kTiledBlock x kTiledBlock
constexpr int kTiledK = 32;       // k of a shared-memory tile
constexpr int kTiledPitch = kTiledBlock + 4;  // floats a shared row: float4-aligned, staggered banks

// out[i, j] = round_out((sum_k x[i, k] * w[j, k]) * s_w[j] + bias[j]) for any m (used for m > 16).
// Block (16 x 16 threads) = a 64 x 64 output tile (block b: row-tile b / n_tiles, column-tile
// b % n_tiles); thread (tx, ty) = (tid % 16, tid / 16) sums rows 4 ty + [0, 4) x columns
// 4 tx + [0, 4) in fp32. Per k-tile of 32, thread tid loads elements 8 (tid / 64) + [0, 8) of x row
// and w row tid % 64 (vector loads where aligned, zeros past m / n / k), converts them to fp32 and
// stores them k-major: xs[kk][row], ws[kk][col] (a warp's 32 stores hit 32 banks); the inner loop
// reads one float4 of each per kk (xs: two addresses a warp, broadcast; ws: 16 consecutive).
template <typename TX>
__global__ void __launch_bounds__(256) w8a16_tiled_kernel(const WeightOnlyArgs a) {
  __shared__ __align__(16) float xs[kTiledK][kTiledPitch];
  __shared__ __align__(16) float ws[kTiledK][kTiledPitch];
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t block = blockIdx.x;
  const int m0 = static_cast<int>(block / a.n_tiles) * kTiledBlock;
  const int n0 = static_cast<int>(block % a.n_tiles) * kTiledBlock;
  const TX* x = static_cast<const TX*>(a.x);

  const int load_row = tid % kTiledBlock;
  const int load_k = (tid / kTiledBlock) * 8;
  const int x_row = m0 + load_row;
  const int w_col = n0 + load_row;
  const TX* x_src = x + int64_t(x_row < a.m ? x_row : 0) * a.k + load_k;
  const int8_t* w_src = a.w + int64_t(w_col < a.n ? w_col : 0) * a.k + load_k;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }

  for (int k0 = 0; k0 < a.k; k0 += kTiledK) {
    const int64_t left = int64_t(a.k) - k0 - load_k;  // elements of the row from this thread's first
    float x_float[8];
    load_floats<TX, 8>(x_src + k0, x_row < a.m ? left : 0, a.x_vector, x_float);
    uint32_t w_words[2];
    load_int8<8, false>(w_src + k0, w_col < a.n ? left : 0, a.w_vector, w_words);
    float w_float[2][4];
    int8x4_to_floats(w_words[0], w_float[0]);
    int8x4_to_floats(w_words[1], w_float[1]);

    __syncthreads();  // the previous tile's readers are done
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      xs[load_k + e][load_row] = x_float[e];
      ws[load_k + e][load_row] = w_float[e / 4][e % 4];
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTiledK; ++kk) {
      const float4 xv = *reinterpret_cast<const float4*>(&xs[kk][4 * ty]);
      const float4 wv = *reinterpret_cast<const float4*>(&ws[kk][4 * tx]);
      const float xr[4] = {xv.x, xv.y, xv.z, xv.w};
      const float wr[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xr[i], wr[j], acc[i][j]);
      }
    }
  }

  TX* out = static_cast<TX*>(a.out);
  const TX* bias = static_cast<const TX*>(a.bias);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int col = n0 + 4 * tx + j;
    if (col >= a.n) continue;
    const float w_scale = a.w_scale[col];
    const float b = bias != nullptr ? to_float<TX>(bias[col]) : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = m0 + 4 * ty + i;
      if (row >= a.m) continue;
      out[int64_t(row) * a.n + col] = from_float<TX>(scale_and_bias(acc[i][j], w_scale, b, bias != nullptr));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: plans and dispatch
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Allows `kernel` kSmem bytes of dynamic shared memory (the opt-in above 48 KB is per device;
// set once for each of devices 0..63, every call for others). False when the runtime refused it;
// the error then stays for the caller's cudaGetLastError.
template <int kSmem, typename Kernel>
bool allow_shared_memory(Kernel kernel) {
  if constexpr (kSmem <= 48 * 1024) {
    return true;
  } else {
    static std::atomic<uint64_t> configured{0};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) device = 0;
    const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
    if (bit != 0 && (configured.load(std::memory_order_acquire) & bit) != 0) return true;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess) {
      return false;
    }
    configured.fetch_or(bit, std::memory_order_release);
    return true;
  }
}

void launch_quantize(const QuantizeParams& p, cudaStream_t stream) {
  const int vec = 16 / dtype_size(p.dtype);
  const bool vectorized = p.cols % vec == 0 && is_aligned(p.x, 16) && is_aligned(p.q, vec);
  const int64_t units = vectorized ? p.cols / vec : p.cols;
  // About 4 units a thread, 32 to 1024 threads a row, several short rows a block.
  const int threads_per_row = static_cast<int>(std::clamp<int64_t>(ceil_div(ceil_div(units, 4), 32) * 32, 32, 1024));
  const int rows_per_block = std::max(1, 256 / threads_per_row);
  const int64_t grid = std::min(ceil_div(p.rows, rows_per_block), int64_t(device_limits().sm_count) * 16);
  const dim3 block(threads_per_row, rows_per_block);
  with_float_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    if (vectorized) {
      quantize_per_token_kernel<T, kVec><<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
    } else {
      quantize_per_token_kernel<T, 1><<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
    }
  });
}

template <typename Tile>
void launch_gemm(GemmArgs args, cudaStream_t stream) {
  args.m_tiles = static_cast<int>(ceil_div(args.m, Tile::kBlockM));
  args.n_tiles = static_cast<int>(ceil_div(args.n, Tile::kBlockN));
  auto kernel = int8_gemm_kernel<Tile>;
  if (!allow_shared_memory<Tile::kSmemBytes>(kernel)) return;
  const unsigned grid = static_cast<unsigned>(int64_t(args.m_tiles) * args.n_tiles);
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(args);
}

void launch_w8a8(const Int8LinearParams& p, cudaStream_t stream) {
  GemmArgs args{};
  args.x_q = p.x_q;
  args.w = p.w;
  args.x_scale = p.x_scale;
  args.w_scale = p.w_scale;
  args.bias = p.bias;
  args.out = p.out;
  args.acc = p.acc;
  args.m = static_cast<int>(p.m);
  args.n = static_cast<int>(p.n);
  args.k = static_cast<int>(p.k);
  args.dtype = p.dtype;
  args.cp_async = p.k % 16 == 0 && is_aligned(p.x_q, 16) && is_aligned(p.w, 16);
  const int64_t out_bytes = p.acc != nullptr ? 4 : dtype_size(p.dtype);
  args.pair_store = p.n % 2 == 0 && is_aligned(p.acc != nullptr ? static_cast<const void*>(p.acc) : p.out, 2 * out_bytes);
  const bool large = p.m > 64 && ceil_div(p.m, LargeTile::kBlockM) * ceil_div(p.n, LargeTile::kBlockN) >= device_limits().sm_count;
  if (large) {
    launch_gemm<LargeTile>(args, stream);
  } else {
    launch_gemm<SmallTile>(args, stream);
  }
}

constexpr int64_t kGemvMaxRows = 16;

// m, n and k up to 2^30: every int the kernels form (a row plus a tile, k plus a chunk) fits.
constexpr int64_t kMaxSize = int64_t(1) << 30;

// The mode, from the pointers the caller set: x_scale and acc belong to w8a8 as x_q does. (Empty
// tensors may come with null data pointers, so x_q alone does not tell the mode when k is 0.)
bool is_w8a8(const Int8LinearParams& p) { return p.x_q != nullptr || p.x_scale != nullptr || p.acc != nullptr; }

template <typename TX, int kRows>
void launch_gemv(const Int8LinearParams& p, WeightOnlyArgs args, cudaStream_t stream) {
  constexpr int64_t kCols = gemv_cols<kRows>();
  // Split k over the warps of a column group until the blocks fill the GPU twice over, as long as
  // every warp keeps at least two full passes (64 chunks of 16) of k.
  const int64_t row_groups = ceil_div(p.m, kRows);
  const int64_t chunks = ceil_div(p.k, 16);
  const int64_t target = 2 * int64_t(device_limits().sm_count);
  int k_split = 1;
  while (k_split < kGemvWarps && ceil_div(p.n, kCols * (kGemvWarps / k_split)) * row_groups < target &&
         chunks >= int64_t(64) * (2 * k_split)) {
    k_split *= 2;
  }
  args.k_split = k_split;
  args.w_vector = p.k % 16 == 0 && is_aligned(p.w, 16);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kCols * (kGemvWarps / k_split))),
                  static_cast<unsigned>(row_groups));
  w8a16_gemv_kernel<TX, kRows><<<grid, 32 * kGemvWarps, 0, stream>>>(args);
}

template <typename TX>
void launch_tiled(const Int8LinearParams& p, WeightOnlyArgs args, cudaStream_t stream) {
  args.n_tiles = static_cast<int>(ceil_div(p.n, kTiledBlock));
  args.w_vector = p.k % 8 == 0 && is_aligned(p.w, 8);
  const unsigned grid = static_cast<unsigned>(ceil_div(p.m, kTiledBlock) * args.n_tiles);
  w8a16_tiled_kernel<TX><<<grid, 256, 0, stream>>>(args);
}

void launch_w8a16(const Int8LinearParams& p, cudaStream_t stream) {
  WeightOnlyArgs args{};
  args.x = p.x;
  args.w = p.w;
  args.w_scale = p.w_scale;
  args.bias = p.bias;
  args.out = p.out;
  args.m = static_cast<int>(p.m);
  args.n = static_cast<int>(p.n);
  args.k = static_cast<int>(p.k);
  args.x_vector = (p.k * dtype_size(p.dtype)) % 16 == 0 && is_aligned(p.x, 16);
  with_float_type(p.dtype, [&](auto tag) {
    using TX = typename decltype(tag)::type;
    if (p.m == 1) {
      launch_gemv<TX, 1>(p, args, stream);
    } else if (p.m == 2) {
      launch_gemv<TX, 2>(p, args, stream);
    } else if (p.m <= 4) {
      launch_gemv<TX, 4>(p, args, stream);
    } else if (p.m <= kGemvMaxRows) {
      launch_gemv<TX, 8>(p, args, stream);  // two row groups past 8
    } else {
      launch_tiled<TX>(p, args, stream);
    }
  });
}

}  // namespace

const char* int8_linear_unsupported(const Int8LinearParams& p) {
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.m > kMaxSize || p.n > kMaxSize || p.k > kMaxSize) {
    return "int8_linear takes m, n and k up to 2^30";
  }
  // Blocks of the one-dimensional grids: the most are the w8a8 small tile's (32 x 64 outputs).
  if (ceil_div(p.m, SmallTile::kBlockM) * ceil_div(p.n, SmallTile::kBlockN) > 2147483647) {
    return "int8_linear's output is too large for one launch";
  }
  if (p.acc != nullptr && p.x != nullptr) return "acc (the raw int32 product) is w8a8 only";
  const bool w8a8 = is_w8a8(p);
  if (w8a8 && p.x != nullptr) return "int8_linear takes x_q (w8a8) or x (w8a16), not both";
  if (w8a8 && p.k > kInt8LinearMaxExactK) {
    return "w8a8 accumulates in int32, exact for k <= 133144 only (k * 127 * 127 < 2^31)";
  }
  if (p.m == 0 || p.n == 0) return "";  // nothing to write, nothing read
  if (p.k > 0 && (w8a8 ? static_cast<const void*>(p.x_q) : p.x) == nullptr) {
    return "int8_linear needs x_q (w8a8) or x (w8a16)";
  }
  if (p.k > 0 && p.w == nullptr) return "int8_linear needs w";
  if (w8a8 && p.acc == nullptr && (p.x_scale == nullptr || p.w_scale == nullptr || p.out == nullptr)) {
    return "w8a8 needs x_scale, w_scale and out (or acc for the raw product)";
  }
  if (!w8a8 && (p.w_scale == nullptr || p.out == nullptr)) return "w8a16 needs w_scale and out";
  return "";
}

void quantize_per_token_launch(const QuantizeParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols < 0) return;
  launch_quantize(p, stream);
}

void int8_linear_launch(const Int8LinearParams& p, cudaStream_t stream) {
  if (int8_linear_unsupported(p)[0] != '\0' || p.m == 0 || p.n == 0) return;
  if (is_w8a8(p)) {
    launch_w8a8(p, stream);
  } else {
    launch_w8a16(p, stream);
  }
}

}  // namespace transfuse::cuda
