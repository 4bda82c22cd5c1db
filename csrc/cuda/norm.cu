// CUDA kernels for fused (residual add +) LayerNorm / RMSNorm. The math is stated in common/norm.h.
//
// How the work is laid out. A row of `cols` elements is handled by a group of `threads_per_row`
// threads (blockDim.x, a multiple of 32: one warp for short rows, up to a whole block for long ones);
// a block holds `rows_per_block` such groups (blockDim.y) and walks over the rows grid-stride.
// When the row length and every pointer allow it, rows are read and written in vectors of
// 16 bytes of x (kVec = 16 / sizeof(x) elements; the other tensors use the same element count), and
// thread t of a group owns the vectors t, t + threads_per_row, t + 2 * threads_per_row, ...
//
// Forward
//   norm_forward_registers_kernel   rows of up to 8192 vectors: read once into registers, where
//                                   they stay for the mean, the variance and the output.
//   norm_forward_streaming_kernel   any other row (longer, or not vector-aligned): every pass
//                                   re-reads the row, mostly from L1/L2.
// Backward
//   norm_backward_registers_kernel  rows of up to 512 * kChunks vectors: dx with the row in registers;
//                                   each block keeps its sums of dy * x_hat and dy in registers over
//                                   its rows and writes them as one row of partial sums.
//   norm_backward_row_means_kernel  longer or unaligned rows: mean(g) and mean(g * x_hat) per row,
//   + norm_backward_tiles_kernel    then dx and the partial sums by tiles of columns.
//   norm_backward_reduce_kernel     dweight / dbias = the sum of the partial rows, column-parallel.
// All statistics and sums are fp32; every input is converted to fp32 on load.

#include "norm.h"

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
// Element types and vectors
// ------------------------------------------------------------------------------------------------

// round_T of common/norm.h: to dtype T (round to nearest even) and back.
template <typename T>
__device__ __forceinline__ float round_to(float value) {
  return to_float<T>(from_float<T>(value));
}

__device__ __forceinline__ float round_to_dtype(float value, DType dtype) {
  switch (dtype) {
    case DType::f16: return round_to<__half>(value);
    case DType::bf16: return round_to<__nv_bfloat16>(value);
    default: return value;
  }
}

// rstd = 1 / sqrt(v) with v = variance + eps, or NaN where v is not finite: a variance that
// overflows fp32 makes the row's output NaN (as eager layer_norm gives), not zeros.
__device__ __forceinline__ float inverse_std(float v) {
  return v < __int_as_float(0x7f800000) ? 1.f / sqrtf(v) : __int_as_float(0x7fc00000);
}

// kN consecutive elements of T held as the 32-bit words one vector access moves (4, 8, 16 or
// 32 bytes; 32 bytes take two 16-byte accesses). A row cached in registers this way costs
// sizeof(T) bytes an element; get() converts one element to float when it is used.
template <typename T, int kN>
struct Packed {
  static constexpr int kBytes = static_cast<int>(sizeof(T)) * kN;
  static constexpr int kWords = kBytes / 4;
  static_assert(kBytes % 4 == 0 && (kBytes <= 16 || kBytes % 16 == 0), "unsupported vector size");

  uint32_t words[kWords];

  __device__ __forceinline__ float get(int i) const {
    if constexpr (std::is_same_v<T, float>) {
      return __uint_as_float(words[i]);
    } else {
      const uint32_t word = words[i / 2];
      const unsigned short bits =
          static_cast<unsigned short>(i % 2 == 0 ? (word & 0xffffu) : (word >> 16));
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        return __uint_as_float(static_cast<uint32_t>(bits) << 16);
      } else {
        return __half2float(__ushort_as_half(bits));
      }
    }
  }

  __device__ __forceinline__ void set_zero() {
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = 0u;
  }

  // Stores values rounded to T.
  __device__ __forceinline__ void set(const float (&values)[kN]) {
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int i = 0; i < kN; ++i) words[i] = __float_as_uint(values[i]);
    } else {
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        uint32_t word;
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
          const __nv_bfloat162 pair = __floats2bfloat162_rn(values[2 * w], values[2 * w + 1]);
          memcpy(&word, &pair, sizeof(word));
        } else {
          const __half2 pair = __floats2half2_rn(values[2 * w], values[2 * w + 1]);
          memcpy(&word, &pair, sizeof(word));
        }
        words[w] = word;
      }
    }
  }

  // ptr must be aligned to min(kBytes, 16).
  __device__ __forceinline__ void load(const T* ptr) {
    if constexpr (kBytes >= 16) {
      const uint4* src = reinterpret_cast<const uint4*>(ptr);
#pragma unroll
      for (int q = 0; q < kBytes / 16; ++q) {
        const uint4 v = src[q];
        words[4 * q + 0] = v.x;
        words[4 * q + 1] = v.y;
        words[4 * q + 2] = v.z;
        words[4 * q + 3] = v.w;
      }
    } else if constexpr (kBytes == 8) {
      const uint2 v = *reinterpret_cast<const uint2*>(ptr);
      words[0] = v.x;
      words[1] = v.y;
    } else {
      words[0] = *reinterpret_cast<const uint32_t*>(ptr);
    }
  }

  __device__ __forceinline__ void store(T* ptr) const {
    if constexpr (kBytes >= 16) {
      uint4* dst = reinterpret_cast<uint4*>(ptr);
#pragma unroll
      for (int q = 0; q < kBytes / 16; ++q) {
        dst[q] = make_uint4(words[4 * q + 0], words[4 * q + 1], words[4 * q + 2], words[4 * q + 3]);
      }
    } else if constexpr (kBytes == 8) {
      *reinterpret_cast<uint2*>(ptr) = make_uint2(words[0], words[1]);
    } else {
      *reinterpret_cast<uint32_t*>(ptr) = words[0];
    }
  }
};

// kN consecutive elements from ptr as floats: one vector access when kN > 1, a scalar one else.
template <typename T, int kN>
__device__ __forceinline__ void load_floats(const T* ptr, float (&values)[kN]) {
  if constexpr (kN == 1) {
    values[0] = to_float<T>(*ptr);
  } else {
    Packed<T, kN> packed;
    packed.load(ptr);
#pragma unroll
    for (int i = 0; i < kN; ++i) values[i] = packed.get(i);
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_floats(T* ptr, const float (&values)[kN]) {
  if constexpr (kN == 1) {
    *ptr = from_float<T>(values[0]);
  } else {
    Packed<T, kN> packed;
    packed.set(values);
    packed.store(ptr);
  }
}

// Elements [index, index + kN) of a [cols] vector of the weight dtype (weight or bias), as floats.
// The dtype is a run-time switch (the same branch for every thread): weight and bias are small and
// mostly read from L1/L2, so this saves a template parameter on every kernel.
template <int kN>
__device__ __forceinline__ void load_weight_dtype(const void* base, DType dtype, int64_t index,
                                                  float (&values)[kN]) {
  switch (dtype) {
    case DType::f16:
      load_floats<__half, kN>(static_cast<const __half*>(base) + index, values);
      break;
    case DType::bf16:
      load_floats<__nv_bfloat16, kN>(static_cast<const __nv_bfloat16*>(base) + index, values);
      break;
    default:
      load_floats<float, kN>(static_cast<const float*>(base) + index, values);
      break;
  }
}

// The factor multiplying x_hat: weight_offset + weight, or 1 when there is no weight.
template <int kN>
__device__ __forceinline__ void load_scale(const void* weight, DType dtype, float weight_offset,
                                           int64_t index, float (&scale)[kN]) {
  if (weight == nullptr) {
#pragma unroll
    for (int i = 0; i < kN; ++i) scale[i] = 1.f;
    return;
  }
  load_weight_dtype<kN>(weight, dtype, index, scale);
#pragma unroll
  for (int i = 0; i < kN; ++i) scale[i] = weight_offset + scale[i];
}

// y = round_out(round_normalized(x_hat) * (weight_offset + w) + b) for the kN columns from col;
// y_at points at column col of the row.
template <typename TO, int kN>
__device__ __forceinline__ void write_output(const NormForwardParams& p, TO* y_at, int64_t col,
                                             float (&x_hat)[kN]) {
  float scale[kN];
  load_scale<kN>(p.weight, p.weight_dtype, p.weight_offset, col, scale);
  float shift[kN];
  if (p.bias != nullptr) {
    load_weight_dtype<kN>(p.bias, p.weight_dtype, col, shift);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) shift[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    x_hat[i] = round_to_dtype(x_hat[i], p.normalized_dtype) * scale[i] + shift[i];
  }
  store_floats<TO, kN>(y_at, x_hat);
}

// ------------------------------------------------------------------------------------------------
// Reductions over the threads of a row
// ------------------------------------------------------------------------------------------------

// Butterfly sum over a warp: every lane ends with the same bits (each step adds the same two
// numbers on both sides, and float addition commutes).
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// values[k] = their sum over the blockDim.x threads of this thread's row group (threadIdx.y); every
// thread of the group gets the same total. blockDim.x is a multiple of 32. When blockDim.x > 32,
// every thread of the block must call this (it holds two __syncthreads).
template <int kValues>
__device__ __forceinline__ void row_sum(float (&values)[kValues]) {
#pragma unroll
  for (int k = 0; k < kValues; ++k) values[k] = warp_sum(values[k]);
  if (blockDim.x == 32) return;

  __shared__ float warp_totals[kValues][32];  // a block has at most 32 warps
  const int warps_per_row = static_cast<int>(blockDim.x) / 32;
  const int first_warp = static_cast<int>(threadIdx.y) * warps_per_row;
  const int warp = first_warp + static_cast<int>(threadIdx.x) / 32;
  __syncthreads();  // the previous call's readers are done with warp_totals
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int k = 0; k < kValues; ++k) warp_totals[k][warp] = values[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kValues; ++k) {
    float total = 0.f;
    for (int w = 0; w < warps_per_row; ++w) total += warp_totals[k][first_warp + w];
    values[k] = total;
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// Forward with the row in registers; each thread holds kChunks vectors of kVec = 16 / sizeof(TX)
// elements of h (rows need cols % kVec == 0 and at most threads_per_row * kChunks vectors).
//   h     = round_x(x + residual)                 (written to residual_out when residual is given)
//   mean  = sum(h) / cols                          (LayerNorm; 0 for RMSNorm)
//   rstd  = 1 / sqrt(sum((h - mean)^2) / cols + eps)   (two passes over the registers; NaN
//           where that overflows)
//   y     = round_out(round_normalized((h - mean) * rstd) * (weight_offset + w) + b)
template <typename TX, typename TO, int kChunks>
__global__ void __launch_bounds__(1024) norm_forward_registers_kernel(const NormForwardParams p) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(TX));
  constexpr bool kStoreResidualEarly = kChunks >= 8;
  const TX* x = static_cast<const TX*>(p.x);
  const TX* residual = static_cast<const TX*>(p.residual);
  TX* residual_out = static_cast<TX*>(p.residual_out);
  TO* y = static_cast<TO*>(p.y);
  const int threads_per_row = static_cast<int>(blockDim.x);
  const int vectors_per_row = static_cast<int>(p.cols / kVec);
  const float cols = static_cast<float>(p.cols);

  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows;
       first_row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool row_valid = row < p.rows;
    const int64_t row_start = row * p.cols;

    Packed<TX, kVec> h[kChunks];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
      if (row_valid && v < vectors_per_row) {
        const int64_t offset = row_start + int64_t(v) * kVec;
        h[i].load(x + offset);
        if (residual != nullptr) {
          Packed<TX, kVec> r;
          r.load(residual + offset);
          float sum[kVec];
#pragma unroll
          for (int j = 0; j < kVec; ++j) sum[j] = h[i].get(j) + r.get(j);
          h[i].set(sum);  // rounds to TX
          // Stored with y, so that no store sits between the loads; but at 8 vectors a thread
          // (1024 threads, 64 registers) storing now keeps fewer loads in registers at once.
          if (kStoreResidualEarly && residual_out != nullptr) h[i].store(residual_out + offset);
        }
      } else {
        h[i].set_zero();
      }
    }

    float mean = 0.f;
    if (!p.rms) {
      float sum[1] = {0.f};  // the zeros of missing vectors add nothing
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum[0] += h[i].get(j);
      }
      row_sum(sum);
      mean = sum[0] / cols;
    }
    float squares[1] = {0.f};
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
      if (v < vectors_per_row) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float centered = h[i].get(j) - mean;
          squares[0] += centered * centered;
        }
      }
    }
    row_sum(squares);
    const float rstd = inverse_std(squares[0] / cols + p.eps);

    if (row_valid) {
      if (threadIdx.x == 0) {
        if (p.mean != nullptr) p.mean[row] = mean;
        if (p.rstd != nullptr) p.rstd[row] = rstd;
      }
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
        if (v < vectors_per_row) {
          const int64_t offset = row_start + int64_t(v) * kVec;
          if (!kStoreResidualEarly && residual != nullptr && residual_out != nullptr) {
            h[i].store(residual_out + offset);
          }
          float x_hat[kVec];
#pragma unroll
          for (int j = 0; j < kVec; ++j) x_hat[j] = (h[i].get(j) - mean) * rstd;
          write_output<TO, kVec>(p, y + offset, int64_t(v) * kVec, x_hat);
        }
      }
    }
  }
}

// Forward for rows of any length and alignment, kVec elements at a time (kVec = 1: scalar).
// Same math as norm_forward_registers_kernel, with the row re-read for each pass:
//   pass 1  h = round_x(x + residual) (stored to residual_out), sum(h) (LayerNorm) or sum(h^2) (RMSNorm)
//   pass 2  sum((h - mean)^2)                     (LayerNorm only; h re-read)
//   pass 3  y = round_out(round_normalized((h - mean) * rstd) * (weight_offset + w) + b)
template <typename TX, typename TO, int kVec>
__device__ __forceinline__ void forward_streaming(const NormForwardParams& p) {
  const TX* x = static_cast<const TX*>(p.x);
  const TX* residual = static_cast<const TX*>(p.residual);
  TX* residual_out = static_cast<TX*>(p.residual_out);
  TO* y = static_cast<TO*>(p.y);
  const int64_t vectors_per_row = p.cols / kVec;
  const float cols = static_cast<float>(p.cols);
  // After pass 1, h is re-read from residual_out (this thread wrote those very elements).
  const bool h_in_residual_out = residual != nullptr && residual_out != nullptr;

  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows;
       first_row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool row_valid = row < p.rows;
    const int64_t row_start = row * p.cols;

    auto load_h = [&](int64_t offset, float(&h)[kVec]) {
      if (h_in_residual_out) {
        load_floats<TX, kVec>(residual_out + offset, h);
        return;
      }
      load_floats<TX, kVec>(x + offset, h);
      if (residual != nullptr) {
        float r[kVec];
        load_floats<TX, kVec>(residual + offset, r);
#pragma unroll
        for (int j = 0; j < kVec; ++j) h[j] = round_to<TX>(h[j] + r[j]);
      }
    };

    float total[1] = {0.f};
    if (row_valid) {
      for (int64_t v = threadIdx.x; v < vectors_per_row; v += blockDim.x) {
        const int64_t offset = row_start + v * kVec;
        float h[kVec];
        load_floats<TX, kVec>(x + offset, h);
        if (residual != nullptr) {
          float r[kVec];
          load_floats<TX, kVec>(residual + offset, r);
#pragma unroll
          for (int j = 0; j < kVec; ++j) h[j] = round_to<TX>(h[j] + r[j]);
          if (residual_out != nullptr) store_floats<TX, kVec>(residual_out + offset, h);
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) total[0] += p.rms ? h[j] * h[j] : h[j];
      }
    }
    row_sum(total);

    float mean = 0.f;
    float rstd;
    if (p.rms) {
      rstd = inverse_std(total[0] / cols + p.eps);
    } else {
      mean = total[0] / cols;
      float squares[1] = {0.f};
      if (row_valid) {
        for (int64_t v = threadIdx.x; v < vectors_per_row; v += blockDim.x) {
          float h[kVec];
          load_h(row_start + v * kVec, h);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const float centered = h[j] - mean;
            squares[0] += centered * centered;
          }
        }
      }
      row_sum(squares);
      rstd = inverse_std(squares[0] / cols + p.eps);
    }

    if (row_valid) {
      if (threadIdx.x == 0) {
        if (p.mean != nullptr) p.mean[row] = mean;
        if (p.rstd != nullptr) p.rstd[row] = rstd;
      }
      for (int64_t v = threadIdx.x; v < vectors_per_row; v += blockDim.x) {
        float x_hat[kVec];
        load_h(row_start + v * kVec, x_hat);
#pragma unroll
        for (int j = 0; j < kVec; ++j) x_hat[j] = (x_hat[j] - mean) * rstd;
        write_output<TO, kVec>(p, y + row_start + v * kVec, v * kVec, x_hat);
      }
    }
  }
}

template <typename TX, typename TO>
__global__ void __launch_bounds__(1024)
    norm_forward_streaming_kernel(const NormForwardParams p, bool vectorized) {
  if (vectorized) {
    forward_streaming<TX, TO, 16 / static_cast<int>(sizeof(TX))>(p);
  } else {
    forward_streaming<TX, TO, 1>(p);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// Backward with the row in registers (kChunks vectors of h and dy a thread, as in the forward):
//   g      = dy * (weight_offset + w),   x_hat = (h - mean) * rstd
//   dx     = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) + dresidual_out   (RMSNorm: no mean(g))
//   partial_dweight[blockIdx.x, c] = sum over the block's rows of dy * x_hat   (kept in registers,
//   partial_dbias[blockIdx.x, c]   = sum over the block's rows of dy            written at the end)
// With several row groups in a block (blockDim.y > 1) their sums are added in shared memory
// (2 * cols floats of dynamic shared memory) before the block writes its partial row.
template <typename TX, typename TO, int kChunks>
__global__ void __launch_bounds__(512)
    norm_backward_registers_kernel(const NormBackwardParams p, float* partial_dweight,
                                   float* partial_dbias) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(TX));
  const TO* dy = static_cast<const TO*>(p.dy);
  const TX* h = static_cast<const TX*>(p.h);
  const TX* dresidual_out = static_cast<const TX*>(p.dresidual_out);
  TX* dx = static_cast<TX*>(p.dx);
  const int threads_per_row = static_cast<int>(blockDim.x);
  const int vectors_per_row = static_cast<int>(p.cols / kVec);
  const float cols = static_cast<float>(p.cols);
  const bool has_mean = !p.rms && p.mean != nullptr;

  float dweight_sum[kChunks][kVec];
  float dbias_sum[kChunks][kVec];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) dweight_sum[i][j] = dbias_sum[i][j] = 0.f;
  }

  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows;
       first_row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool row_valid = row < p.rows;
    const int64_t row_start = row * p.cols;
    const float mean = row_valid && has_mean ? p.mean[row] : 0.f;
    const float rstd = row_valid ? p.rstd[row] : 0.f;

    Packed<TX, kVec> h_vec[kChunks];
    Packed<TO, kVec> dy_vec[kChunks];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
      if (row_valid && v < vectors_per_row) {
        h_vec[i].load(h + row_start + int64_t(v) * kVec);
        dy_vec[i].load(dy + row_start + int64_t(v) * kVec);
      } else {
        h_vec[i].set_zero();
        dy_vec[i].set_zero();
      }
    }

    float sums[2] = {0.f, 0.f};  // sum(g), sum(g * x_hat)
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
      if (row_valid && v < vectors_per_row) {
        float scale[kVec];
        load_scale<kVec>(p.weight, p.weight_dtype, p.weight_offset, int64_t(v) * kVec, scale);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float x_hat = (h_vec[i].get(j) - mean) * rstd;
          const float grad = dy_vec[i].get(j);
          const float g = grad * scale[j];
          sums[0] += g;
          sums[1] += g * x_hat;
          dweight_sum[i][j] += grad * x_hat;
          dbias_sum[i][j] += grad;
        }
      }
    }
    row_sum(sums);
    const float mean_g = p.rms ? 0.f : sums[0] / cols;
    const float mean_g_xhat = sums[1] / cols;

    // dresidual_out loaded for all vectors before the first dx store, so the loads overlap.
    Packed<TX, kVec> dres_vec[kChunks];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
      if (dresidual_out != nullptr && row_valid && v < vectors_per_row) {
        dres_vec[i].load(dresidual_out + row_start + int64_t(v) * kVec);
      } else {
        dres_vec[i].set_zero();
      }
    }
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
      if (row_valid && v < vectors_per_row) {
        float scale[kVec];
        load_scale<kVec>(p.weight, p.weight_dtype, p.weight_offset, int64_t(v) * kVec, scale);
        float dh[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float x_hat = (h_vec[i].get(j) - mean) * rstd;
          const float g = dy_vec[i].get(j) * scale[j];
          dh[j] = rstd * (g - mean_g - x_hat * mean_g_xhat) + dres_vec[i].get(j);
        }
        store_floats<TX, kVec>(dx + row_start + int64_t(v) * kVec, dh);
      }
    }
  }

  if (partial_dweight == nullptr && partial_dbias == nullptr) return;
  const int64_t partial_start = int64_t(blockIdx.x) * p.cols;
  if (blockDim.y == 1) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
      if (v < vectors_per_row) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int64_t col = int64_t(v) * kVec + j;
          if (partial_dweight != nullptr) partial_dweight[partial_start + col] = dweight_sum[i][j];
          if (partial_dbias != nullptr) partial_dbias[partial_start + col] = dbias_sum[i][j];
        }
      }
    }
    return;
  }

  // Several row groups: each adds its sums into shared memory in turn (they own the same columns).
  extern __shared__ float block_sums[];  // [2, cols]: dweight, dbias
  float* block_dweight = block_sums;
  float* block_dbias = block_sums + p.cols;
  for (int group = 0; group < static_cast<int>(blockDim.y); ++group) {
    if (static_cast<int>(threadIdx.y) == group) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int v = static_cast<int>(threadIdx.x) + i * threads_per_row;
        if (v < vectors_per_row) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const int col = v * kVec + j;
            block_dweight[col] = group == 0 ? dweight_sum[i][j] : block_dweight[col] + dweight_sum[i][j];
            block_dbias[col] = group == 0 ? dbias_sum[i][j] : block_dbias[col] + dbias_sum[i][j];
          }
        }
      }
    }
    __syncthreads();
  }
  const int block_threads = static_cast<int>(blockDim.x * blockDim.y);
  for (int col = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x); col < p.cols;
       col += block_threads) {
    if (partial_dweight != nullptr) partial_dweight[partial_start + col] = block_dweight[col];
    if (partial_dbias != nullptr) partial_dbias[partial_start + col] = block_dbias[col];
  }
}

// Row means for the tiled backward, kVec elements at a time (kVec = 1: scalar):
//   g = dy * (weight_offset + w),  x_hat = (h - mean) * rstd
//   row_means[row] = {mean(g) (0 for RMSNorm), mean(g * x_hat)}
template <typename TX, typename TO, int kVec>
__device__ __forceinline__ void backward_row_means(const NormBackwardParams& p, float* row_means) {
  const TO* dy = static_cast<const TO*>(p.dy);
  const TX* h = static_cast<const TX*>(p.h);
  const int64_t vectors_per_row = p.cols / kVec;
  const float cols = static_cast<float>(p.cols);
  const bool has_mean = !p.rms && p.mean != nullptr;

  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows;
       first_row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool row_valid = row < p.rows;
    const int64_t row_start = row * p.cols;
    float sums[2] = {0.f, 0.f};  // sum(g), sum(g * x_hat)
    if (row_valid) {
      const float mean = has_mean ? p.mean[row] : 0.f;
      const float rstd = p.rstd[row];
      for (int64_t v = threadIdx.x; v < vectors_per_row; v += blockDim.x) {
        float h_val[kVec], dy_val[kVec], scale[kVec];
        load_floats<TX, kVec>(h + row_start + v * kVec, h_val);
        load_floats<TO, kVec>(dy + row_start + v * kVec, dy_val);
        load_scale<kVec>(p.weight, p.weight_dtype, p.weight_offset, v * kVec, scale);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float g = dy_val[j] * scale[j];
          sums[0] += g;
          sums[1] += g * ((h_val[j] - mean) * rstd);
        }
      }
    }
    row_sum(sums);
    if (row_valid && threadIdx.x == 0) {
      row_means[2 * row] = p.rms ? 0.f : sums[0] / cols;
      row_means[2 * row + 1] = sums[1] / cols;
    }
  }
}

template <typename TX, typename TO>
__global__ void __launch_bounds__(1024)
    norm_backward_row_means_kernel(const NormBackwardParams p, bool vectorized, float* row_means) {
  if (vectorized) {
    backward_row_means<TX, TO, 16 / static_cast<int>(sizeof(TX))>(p, row_means);
  } else {
    backward_row_means<TX, TO, 1>(p, row_means);
  }
}

constexpr int kTileThreads = 128;

// Backward by tiles of kTileThreads * kVec columns (grid.x) and groups of rows (grid.y, rows
// blockIdx.y, blockIdx.y + gridDim.y, ...), with {mean(g), mean(g * x_hat)} from row_means:
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) + dresidual_out
//   partial_dweight[blockIdx.y, c] = sum over the group's rows of dy * x_hat
//   partial_dbias[blockIdx.y, c]   = sum over the group's rows of dy
// Each thread owns kVec consecutive columns (kVec divides cols when kVec > 1).
template <typename TX, typename TO, int kVec>
__global__ void __launch_bounds__(kTileThreads)
    norm_backward_tiles_kernel(const NormBackwardParams p, const float* row_means,
                               float* partial_dweight, float* partial_dbias) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (col >= p.cols) return;
  const TO* dy = static_cast<const TO*>(p.dy);
  const TX* h = static_cast<const TX*>(p.h);
  const TX* dresidual_out = static_cast<const TX*>(p.dresidual_out);
  TX* dx = static_cast<TX*>(p.dx);
  const bool has_mean = !p.rms && p.mean != nullptr;
  const int64_t row_step = gridDim.y;

  float scale[kVec];
  load_scale<kVec>(p.weight, p.weight_dtype, p.weight_offset, col, scale);
  float dweight_sum[kVec], dbias_sum[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) dweight_sum[j] = dbias_sum[j] = 0.f;

  // Rows a step: all their loads are issued before the first store, so they are in flight together.
  constexpr int kRowsPerStep = kVec > 1 ? 2 : 4;
  for (int64_t first_row = blockIdx.y; first_row < p.rows; first_row += kRowsPerStep * row_step) {
    float h_val[kRowsPerStep][kVec], dy_val[kRowsPerStep][kVec], dres_val[kRowsPerStep][kVec];
    float mean[kRowsPerStep], rstd[kRowsPerStep], mean_g[kRowsPerStep], mean_g_xhat[kRowsPerStep];
#pragma unroll
    for (int s = 0; s < kRowsPerStep; ++s) {
      const int64_t row = first_row + s * row_step;
      if (row < p.rows) {
        const int64_t offset = row * p.cols + col;
        load_floats<TX, kVec>(h + offset, h_val[s]);
        load_floats<TO, kVec>(dy + offset, dy_val[s]);
        if (dresidual_out != nullptr) {
          load_floats<TX, kVec>(dresidual_out + offset, dres_val[s]);
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) dres_val[s][j] = 0.f;
        }
        mean[s] = has_mean ? p.mean[row] : 0.f;
        rstd[s] = p.rstd[row];
        mean_g[s] = row_means[2 * row];
        mean_g_xhat[s] = row_means[2 * row + 1];
      }
    }
#pragma unroll
    for (int s = 0; s < kRowsPerStep; ++s) {
      const int64_t row = first_row + s * row_step;
      if (row < p.rows) {
        float dh[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float x_hat = (h_val[s][j] - mean[s]) * rstd[s];
          const float g = dy_val[s][j] * scale[j];
          dh[j] = rstd[s] * (g - mean_g[s] - x_hat * mean_g_xhat[s]) + dres_val[s][j];
          dweight_sum[j] += dy_val[s][j] * x_hat;
          dbias_sum[j] += dy_val[s][j];
        }
        store_floats<TX, kVec>(dx + row * p.cols + col, dh);
      }
    }
  }

  const int64_t partial_start = int64_t(blockIdx.y) * p.cols + col;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (partial_dweight != nullptr) partial_dweight[partial_start + j] = dweight_sum[j];
    if (partial_dbias != nullptr) partial_dbias[partial_start + j] = dbias_sum[j];
  }
}

constexpr int kReduceColumns = 32;  // blockDim.x: one warp reads 32 consecutive floats
constexpr int kReduceSlices = 16;   // blockDim.y: threads splitting the partial rows of a column

// out[c] = round_weight(sum over q of partials[q, c]), q < num_partials; 32 columns a block.
template <typename TW>
__global__ void __launch_bounds__(kReduceColumns * kReduceSlices)
    norm_backward_reduce_kernel(const float* partials, int64_t num_partials, int64_t cols, TW* out) {
  __shared__ float slice_sums[kReduceSlices][kReduceColumns + 1];
  const int64_t col = int64_t(blockIdx.x) * kReduceColumns + threadIdx.x;
  float sum = 0.f;
  if (col < cols) {
#pragma unroll 4
    for (int64_t q = threadIdx.y; q < num_partials; q += kReduceSlices) sum += partials[q * cols + col];
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int s = 0; s < kReduceSlices; ++s) total += slice_sums[s][threadIdx.x];
    out[col] = from_float<TW>(total);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: launch plans and dispatch
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Alignment needed to access vectors of `vec` elements of dtype (Packed: at most 16 bytes).
int64_t vector_alignment(DType dtype, int vec) {
  return std::min<int64_t>(16, int64_t(vec) * dtype_size(dtype));
}

bool optional_aligned(const void* ptr, int64_t bytes) { return ptr == nullptr || is_aligned(ptr, bytes); }

// Blocks of block_threads threads that fit on the device at once (by thread count).
int64_t resident_blocks(const DeviceLimits& limits, int64_t block_threads) {
  return int64_t(limits.sm_count) * std::max<int64_t>(1, limits.max_threads_per_sm / block_threads);
}

// Threads per row for a streaming pass over `units` vectors (or elements): about 4 each.
int streaming_threads_per_row(int64_t units) {
  return static_cast<int>(std::clamp<int64_t>(round_up(ceil_div(units, 4), 32), 32, 1024));
}

struct ForwardPlan {
  bool vectorized = false;
  bool use_registers = false;
  int chunks = 1;  // registers kernel: vectors a thread holds
  int threads_per_row = 32;
  int rows_per_block = 1;
  int64_t grid = 0;
};

constexpr int kMaxForwardChunks = 8;

ForwardPlan plan_forward(const NormForwardParams& p) {
  ForwardPlan plan;
  const int vec = 16 / dtype_size(p.x_dtype);
  plan.vectorized = p.cols % vec == 0 && is_aligned(p.x, 16) && optional_aligned(p.residual, 16) &&
                    optional_aligned(p.residual_out, 16) &&
                    is_aligned(p.y, vector_alignment(p.out_dtype, vec)) &&
                    optional_aligned(p.weight, vector_alignment(p.weight_dtype, vec)) &&
                    optional_aligned(p.bias, vector_alignment(p.weight_dtype, vec));
  const int64_t vectors = p.cols / vec;
  if (plan.vectorized && vectors <= 32 * 4) {
    // One warp a row, four rows a block.
    plan.use_registers = true;
    plan.threads_per_row = 32;
    plan.rows_per_block = 4;
    plan.chunks = vectors <= 32 ? 1 : vectors <= 64 ? 2 : 4;
  } else if (plan.vectorized && vectors <= 1024 * kMaxForwardChunks) {
    // One block a row, 4 (or 8 past 4096 vectors) vectors a thread.
    plan.use_registers = true;
    plan.chunks = vectors <= 1024 * 4 ? 4 : kMaxForwardChunks;
    plan.threads_per_row = static_cast<int>(round_up(ceil_div(vectors, plan.chunks), 32));
    plan.rows_per_block = 1;
  } else {
    plan.threads_per_row = streaming_threads_per_row(plan.vectorized ? vectors : p.cols);
    plan.rows_per_block = plan.threads_per_row == 32 ? 4 : 1;
  }
  const DeviceLimits limits = device_limits();
  const int64_t block_threads = int64_t(plan.threads_per_row) * plan.rows_per_block;
  plan.grid = std::min(ceil_div(p.rows, plan.rows_per_block), 8 * resident_blocks(limits, block_threads));
  return plan;
}

template <typename TX, typename TO>
void launch_forward(const NormForwardParams& p, const ForwardPlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.grid));
  const dim3 block(plan.threads_per_row, plan.rows_per_block);
  if (!plan.use_registers) {
    norm_forward_streaming_kernel<TX, TO><<<grid, block, 0, stream>>>(p, plan.vectorized);
    return;
  }
  switch (plan.chunks) {
    case 1: norm_forward_registers_kernel<TX, TO, 1><<<grid, block, 0, stream>>>(p); break;
    case 2: norm_forward_registers_kernel<TX, TO, 2><<<grid, block, 0, stream>>>(p); break;
    case 4: norm_forward_registers_kernel<TX, TO, 4><<<grid, block, 0, stream>>>(p); break;
    default: norm_forward_registers_kernel<TX, TO, kMaxForwardChunks><<<grid, block, 0, stream>>>(p); break;
  }
}

struct BackwardPlan {
  bool vectorized = false;
  bool use_registers = false;
  int chunks = 1;  // registers kernel: vectors a thread holds
  int threads_per_row = 32;
  int rows_per_block = 1;
  int64_t grid = 0;  // blocks of the registers kernel or of the row-means kernel
  int64_t column_tiles = 0;  // tiles kernel: grid = (column_tiles, num_partials)
  int64_t num_partials = 0;  // rows of partial sums in the workspace
  bool need_dweight = false;
  bool need_dbias = false;
  int64_t partial_floats = 0;    // num_partials * cols for each of dweight, dbias
  int64_t workspace_floats = 0;  // partial sums, then 2 * rows row means (tiles path)
};

// Vectors a thread of the backward registers kernel holds: h, dy and two fp32 sums each, so 2
// for 16-bit x (24 registers a vector) and 4 for fp32 x (16 registers a vector).
int backward_max_chunks(DType x_dtype) { return x_dtype == DType::f32 ? 4 : 2; }

constexpr int kBackwardMaxThreadsPerRow = 512;
constexpr int kBackwardBlockThreads = 256;  // target size of a block of several row groups
constexpr int kBackwardMinRowsPerPartial = 32;

BackwardPlan plan_backward(const NormBackwardParams& p) {
  BackwardPlan plan;
  if (p.rows <= 0 || p.cols <= 0) return plan;
  const DeviceLimits limits = device_limits();
  const int vec = 16 / dtype_size(p.x_dtype);
  plan.vectorized = p.cols % vec == 0 && is_aligned(p.h, 16) && is_aligned(p.dx, 16) &&
                    optional_aligned(p.dresidual_out, 16) &&
                    is_aligned(p.dy, vector_alignment(p.out_dtype, vec)) &&
                    optional_aligned(p.weight, vector_alignment(p.weight_dtype, vec));
  plan.need_dweight = p.dweight != nullptr;
  plan.need_dbias = p.dbias != nullptr;
  const int max_chunks = backward_max_chunks(p.x_dtype);
  const int64_t vectors = p.cols / vec;
  if (plan.vectorized && vectors <= 32 * max_chunks) {
    plan.use_registers = true;
    plan.threads_per_row = 32;
    plan.chunks = vectors <= 32 ? 1 : vectors <= 64 ? 2 : 4;
  } else if (plan.vectorized && ceil_div(vectors, max_chunks) <= kBackwardMaxThreadsPerRow) {
    plan.use_registers = true;
    plan.chunks = max_chunks;
    plan.threads_per_row = static_cast<int>(round_up(ceil_div(vectors, max_chunks), 32));
  }
  if (plan.use_registers) {
    plan.rows_per_block = std::max(1, kBackwardBlockThreads / plan.threads_per_row);
    const int64_t block_threads = int64_t(plan.threads_per_row) * plan.rows_per_block;
    // Enough blocks to fill the device, but no more than one a kBackwardMinRowsPerPartial rows
    // beyond two an SM: every block writes a row of partial sums that the reduction reads back.
    plan.grid = std::min({ceil_div(p.rows, plan.rows_per_block), resident_blocks(limits, block_threads),
                          std::max<int64_t>(2 * limits.sm_count, ceil_div(p.rows, kBackwardMinRowsPerPartial))});
    plan.num_partials = plan.grid;
  } else {
    plan.threads_per_row = streaming_threads_per_row(plan.vectorized ? vectors : p.cols);
    plan.rows_per_block = plan.threads_per_row == 32 ? 4 : 1;
    const int64_t block_threads = int64_t(plan.threads_per_row) * plan.rows_per_block;
    plan.grid = std::min(ceil_div(p.rows, plan.rows_per_block), 8 * resident_blocks(limits, block_threads));
    const int64_t tile_cols = int64_t(kTileThreads) * (plan.vectorized ? vec : 1);
    plan.column_tiles = ceil_div(p.cols, tile_cols);
    const int64_t row_groups = resident_blocks(limits, kTileThreads) / plan.column_tiles;
    plan.num_partials = std::clamp<int64_t>(row_groups, 1, std::min<int64_t>(p.rows, 65535));
  }
  if (plan.need_dweight || plan.need_dbias) plan.partial_floats = plan.num_partials * p.cols;
  plan.workspace_floats = plan.partial_floats * (int64_t(plan.need_dweight) + int64_t(plan.need_dbias)) +
                          (plan.use_registers ? 0 : 2 * p.rows);
  return plan;
}

template <typename TX, typename TO>
void launch_backward(const NormBackwardParams& p, const BackwardPlan& plan, float* partial_dweight,
                     float* partial_dbias, float* row_means, cudaStream_t stream) {
  const dim3 block(plan.threads_per_row, plan.rows_per_block);
  if (plan.use_registers) {
    const dim3 grid(static_cast<unsigned>(plan.grid));
    const bool block_sums = plan.rows_per_block > 1 && (plan.need_dweight || plan.need_dbias);
    const size_t shared_bytes = block_sums ? 2 * size_t(p.cols) * sizeof(float) : 0;
    auto launch = [&](auto kernel) {
      kernel<<<grid, block, shared_bytes, stream>>>(p, partial_dweight, partial_dbias);
    };
    switch (plan.chunks) {
      case 1: launch(norm_backward_registers_kernel<TX, TO, 1>); break;
      case 2: launch(norm_backward_registers_kernel<TX, TO, 2>); break;
      default:
        // Four vectors a thread only for fp32 x (backward_max_chunks).
        if constexpr (sizeof(TX) == 4) launch(norm_backward_registers_kernel<TX, TO, 4>);
        break;
    }
    return;
  }
  norm_backward_row_means_kernel<TX, TO>
      <<<dim3(static_cast<unsigned>(plan.grid)), block, 0, stream>>>(p, plan.vectorized, row_means);
  const dim3 tiles_grid(static_cast<unsigned>(plan.column_tiles), static_cast<unsigned>(plan.num_partials));
  if (plan.vectorized) {
    norm_backward_tiles_kernel<TX, TO, 16 / sizeof(TX)>
        <<<tiles_grid, kTileThreads, 0, stream>>>(p, row_means, partial_dweight, partial_dbias);
  } else {
    norm_backward_tiles_kernel<TX, TO, 1>
        <<<tiles_grid, kTileThreads, 0, stream>>>(p, row_means, partial_dweight, partial_dbias);
  }
}

void launch_reduce(const float* partials, int64_t num_partials, int64_t cols, void* out, DType dtype,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kReduceColumns)));
  const dim3 block(kReduceColumns, kReduceSlices);
  with_float_type(dtype, [&](auto tag) {
    using TW = typename decltype(tag)::type;
    norm_backward_reduce_kernel<TW><<<grid, block, 0, stream>>>(partials, num_partials, cols,
                                                                 static_cast<TW*>(out));
  });
}

}  // namespace

void norm_forward_launch(const NormForwardParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const ForwardPlan plan = plan_forward(p);
  with_float_type(p.x_dtype, [&](auto x_tag) {
    with_float_type(p.out_dtype, [&](auto out_tag) {
      using TX = typename decltype(x_tag)::type;
      using TO = typename decltype(out_tag)::type;
      launch_forward<TX, TO>(p, plan, stream);
    });
  });
}

int64_t norm_backward_workspace_floats(const NormBackwardParams& p) {
  return plan_backward(p).workspace_floats;
}

void norm_backward_launch(const NormBackwardParams& p, float* workspace, cudaStream_t stream) {
  if (p.cols <= 0) return;
  if (p.rows <= 0) {
    // No rows: the sums over rows are zero (0x00 bytes are 0.0 in every float dtype).
    const size_t bytes = size_t(p.cols) * dtype_size(p.weight_dtype);
    if (p.dweight != nullptr) cudaMemsetAsync(p.dweight, 0, bytes, stream);
    if (p.dbias != nullptr) cudaMemsetAsync(p.dbias, 0, bytes, stream);
    return;
  }
  const BackwardPlan plan = plan_backward(p);
  float* partial_dweight = plan.need_dweight ? workspace : nullptr;
  float* partial_dbias = plan.need_dbias ? workspace + (plan.need_dweight ? plan.partial_floats : 0) : nullptr;
  float* row_means = plan.use_registers
                         ? nullptr
                         : workspace + plan.partial_floats * (int64_t(plan.need_dweight) + int64_t(plan.need_dbias));
  with_float_type(p.x_dtype, [&](auto x_tag) {
    with_float_type(p.out_dtype, [&](auto out_tag) {
      using TX = typename decltype(x_tag)::type;
      using TO = typename decltype(out_tag)::type;
      launch_backward<TX, TO>(p, plan, partial_dweight, partial_dbias, row_means, stream);
    });
  });
  if (plan.need_dweight) launch_reduce(partial_dweight, plan.num_partials, p.cols, p.dweight, p.weight_dtype, stream);
  if (plan.need_dbias) launch_reduce(partial_dbias, plan.num_partials, p.cols, p.dbias, p.weight_dtype, stream);
}

}  // namespace transfuse::cuda
