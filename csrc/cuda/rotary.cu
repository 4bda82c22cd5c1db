// CUDA kernel of the rotary position embedding. The math is stated in common/rotary.h.
//
// How the work is laid out. Memory-bound: every element of q and k is read once and of q_out
// and k_out written once; cos and sin once per position and thread. With h = D / 2, a thread
// owns one vector of kVec pair indices i..i+kVec (i < h) of a position (b, s): it loads c and n
// at i and at i + h once (kept as T, converted at each use), then walks the heads of q and of k
// (one index over both, q's first), reading x[i..] and x[i + h..] of each row and writing both
// halves of its output:
//   forward:  out[i] = x[i] c[i] - x[i+h] n[i],    out[i+h] = x[i+h] c[i+h] + x[i] n[i+h]
//   inverse:  out[i] = x[i] c[i] + x[i+h] n[i+h],  out[i+h] = x[i+h] c[i+h] - x[i] n[i]
// in fp32, rounded once to T. kVec is the widest power of two up to 16 / sizeof(T) that divides
// h and every stride that matters (of a dimension longer than 1), with every pointer aligned to
// kVec elements; else 1. A block is (threads_x, threads_y, threads_z), at most 256 threads
// (registers capped at 64 for 4 resident blocks an SM): threads_x = the h / kVec vectors of a
// row (at most 256; more are walked), threads_y the heads (as many as the head loop's trips
// divide evenly: 40 heads in 2 trips of 20), threads_z positions side by side when a position's
// work is smaller than a block (at most 64). grid.x covers the B * S positions (grid-stride past
// 2^31 - 1 blocks). Offsets are int64; strides are in elements, cos's and sin's batch stride 0
// when they are shared by the batch.

#include "rotary.h"

#include "element.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace transfuse::cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Kernel
// ------------------------------------------------------------------------------------------------

// For each position (b, s) (grid-stride over blockIdx.x, threadIdx.z), each vector of pair
// indices i..i+kVec (threadIdx.x) and each head of q then k (threadIdx.y), with c = cos[b, s],
// n = sin[b, s] and x that head's row of q or k at (b, s):
//   forward:  out[i] = x[i] c[i] - x[i+h] n[i],    out[i+h] = x[i+h] c[i+h] + x[i] n[i+h]
//   inverse:  out[i] = x[i] c[i] + x[i+h] n[i+h],  out[i+h] = x[i+h] c[i+h] - x[i] n[i]
// out = q_out[b, head, s] or k_out[b, head - q_heads, s] (contiguous [B, H, S, D]).
template <typename T, int kVec>
__global__ void __launch_bounds__(256, 4) rotary_kernel(const RotaryParams p) {
  const int64_t dim = p.head_dim;
  const int64_t half = dim / 2;
  const int64_t vectors = half / kVec;
  const int64_t positions = p.batch * p.seq;
  const int64_t heads = p.q_heads + p.k_heads;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  T* q_out = static_cast<T*>(p.q_out);
  T* k_out = static_cast<T*>(p.k_out);
  for (int64_t pos = int64_t(blockIdx.x) * blockDim.z + threadIdx.z; pos < positions;
       pos += int64_t(gridDim.x) * blockDim.z) {
    const int64_t b = pos / p.seq;
    const int64_t s = pos - b * p.seq;
    const T* cos_row = static_cast<const T*>(p.cos) + b * p.cos_strides[0] + s * p.cos_strides[1];
    const T* sin_row = static_cast<const T*>(p.sin) + b * p.sin_strides[0] + s * p.sin_strides[1];
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const int64_t i = v * kVec;
      // kept as T over the head loop (half the registers of floats), converted at each use
      const Vector<T, kVec> c_lo = load_vector<T, kVec>(cos_row + i);
      const Vector<T, kVec> c_hi = load_vector<T, kVec>(cos_row + i + half);
      const Vector<T, kVec> n_lo = load_vector<T, kVec>(sin_row + i);
      const Vector<T, kVec> n_hi = load_vector<T, kVec>(sin_row + i + half);
      for (int64_t head = threadIdx.y; head < heads; head += blockDim.y) {
        const T* x;
        T* out;
        if (head < p.q_heads) {
          x = q + b * p.q_strides[0] + head * p.q_strides[1] + s * p.q_strides[2];
          out = q_out + ((b * p.q_heads + head) * p.seq + s) * dim;
        } else {
          const int64_t kh = head - p.q_heads;
          x = k + b * p.k_strides[0] + kh * p.k_strides[1] + s * p.k_strides[2];
          out = k_out + ((b * p.k_heads + kh) * p.seq + s) * dim;
        }
        float lo[kVec];
        float hi[kVec];
        load_floats<T, kVec>(x + i, lo);
        load_floats<T, kVec>(x + i + half, hi);
        float out_lo[kVec];
        float out_hi[kVec];
        if (p.inverse) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            out_lo[j] = lo[j] * to_float<T>(c_lo.values[j]) + hi[j] * to_float<T>(n_hi.values[j]);
            out_hi[j] = hi[j] * to_float<T>(c_hi.values[j]) - lo[j] * to_float<T>(n_lo.values[j]);
          }
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            out_lo[j] = lo[j] * to_float<T>(c_lo.values[j]) - hi[j] * to_float<T>(n_lo.values[j]);
            out_hi[j] = hi[j] * to_float<T>(c_hi.values[j]) + lo[j] * to_float<T>(n_hi.values[j]);
          }
        }
        store_floats<T, kVec>(out + i, out_lo);
        store_floats<T, kVec>(out + i + half, out_hi);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: vector width, launch plan and dispatch
// ------------------------------------------------------------------------------------------------

constexpr int kBlockThreads = 256;
constexpr int kMaxBlockZ = 64;
constexpr int64_t kMaxGridX = 2147483647;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The widest vector (elements, a power of two up to max_vec) that h, every stride of a dimension
// longer than 1 and every pointer of a non-empty side allow.
int vector_width(const RotaryParams& p, int max_vec) {
  const int64_t elem = dtype_size(p.dtype);
  const int64_t half = p.head_dim / 2;
  for (int vec = max_vec; vec > 1; vec /= 2) {
    auto stride_ok = [&](int64_t stride, int64_t extent) {
      return extent <= 1 || stride % vec == 0;
    };
    auto ptr_ok = [&](const void* ptr) {
      return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(vec * elem) == 0;
    };
    bool ok = half % vec == 0 && ptr_ok(p.cos) && ptr_ok(p.sin) &&
              stride_ok(p.cos_strides[0], p.batch) && stride_ok(p.cos_strides[1], p.seq) &&
              stride_ok(p.sin_strides[0], p.batch) && stride_ok(p.sin_strides[1], p.seq);
    if (p.q_heads > 0) {
      ok = ok && ptr_ok(p.q) && ptr_ok(p.q_out) && stride_ok(p.q_strides[0], p.batch) &&
           stride_ok(p.q_strides[1], p.q_heads) && stride_ok(p.q_strides[2], p.seq);
    }
    if (p.k_heads > 0) {
      ok = ok && ptr_ok(p.k) && ptr_ok(p.k_out) && stride_ok(p.k_strides[0], p.batch) &&
           stride_ok(p.k_strides[1], p.k_heads) && stride_ok(p.k_strides[2], p.seq);
    }
    if (ok) return vec;
  }
  return 1;
}

template <typename T, int kVec>
void launch(const RotaryParams& p, cudaStream_t stream) {
  const int64_t vectors = p.head_dim / 2 / kVec;
  const int64_t heads = p.q_heads + p.k_heads;
  const int64_t positions = p.batch * p.seq;
  const int threads_x = static_cast<int>(std::min<int64_t>(vectors, kBlockThreads));
  // As many head rows as fit, then evened out over the head loop's trips (40 heads in 2 trips
  // of 20, not 32 + 8).
  const int64_t max_y = std::max(1, kBlockThreads / threads_x);
  const int64_t trips = ceil_div(heads, max_y);
  const int threads_y = static_cast<int>(ceil_div(heads, trips));
  const int threads_z = static_cast<int>(std::clamp<int64_t>(
      kBlockThreads / (threads_x * threads_y), 1, std::min<int64_t>(kMaxBlockZ, positions)));
  const dim3 block(threads_x, threads_y, threads_z);
  const dim3 grid(static_cast<unsigned>(std::min(kMaxGridX, ceil_div(positions, threads_z))));
  rotary_kernel<T, kVec><<<grid, block, 0, stream>>>(p);
}

}  // namespace

void rotary_launch(const RotaryParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.seq <= 0 || p.head_dim < 2 || p.q_heads < 0 || p.k_heads < 0 ||
      p.q_heads + p.k_heads == 0) {
    return;
  }
  with_float_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kMaxVec = 16 / static_cast<int>(sizeof(T));
    const int vec = vector_width(p, kMaxVec);
    if constexpr (kMaxVec >= 8) {
      if (vec == 8) return launch<T, 8>(p, stream);
    }
    if (vec == 4) return launch<T, 4>(p, stream);
    if (vec == 2) return launch<T, 2>(p, stream);
    launch<T, 1>(p, stream);
  });
}

}  // namespace transfuse::cuda
