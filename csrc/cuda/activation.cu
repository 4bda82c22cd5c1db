// CUDA kernels of the bias + GELU epilogue and of act(gate) * up (SiLU or GELU). The math is
// stated in common/activation.h.
//
// How the work is laid out. Elementwise and memory-bound: every element of x (and dy; gate and
// up) is read once and y (or dx; dgate and dup) written once. A thread owns one vector of kVec
// consecutive columns (kVec = 16 / sizeof(T): 16-byte loads and stores, when cols and every row
// stride are multiples of kVec and every pointer is 16-byte aligned; else kVec = 1) and walks the
// rows grid-stride, so its bias vector is loaded once. A block is (threads_x, threads_y) = 256
// threads: threads_x covers the row's vectors (a multiple of 32, at most 256), threads_y rows side
// by side when rows are short. grid.x covers the columns, grid.y enough row groups to fill the
// device a few times over. Offsets are int64 (rows * cols may pass 2^31).
//
// Math in fp32 (accurate libdevice functions; no fast-math):
//   none: Phi(z) = normcdff(z) (no cancellation in the negative tail), gelu = z Phi(z),
//         gelu' = Phi(z) + z exp(-z^2 / 2) / sqrt(2 pi)
//   tanh: through the logistic function with m = exp(-|v|), v = -2u (common/activation.h)
//   silu: s = 1 / (1 + expf(-g)) (expf(-g) = inf for g << 0 gives s = 0: the limit), silu = g s
// z = round_T(x + bias) first (as eager's add), the result rounded once to T.

#include "activation.h"

#include "device.h"
#include "element.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace transfuse::cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Math
// ------------------------------------------------------------------------------------------------

constexpr float kInvSqrt2Pi = 0.39894228040143268f;
// v = -2u = z * (kTanhC1 + kTanhC2 * z^2); 2 du/dz = kTanhD1 + kTanhD2 * z^2
constexpr float kTanhC1 = -2.f * kGeluTanhScale;
constexpr float kTanhC2 = -2.f * kGeluTanhScale * kGeluTanhCubic;
constexpr float kTanhD1 = 2.f * kGeluTanhScale;
constexpr float kTanhD2 = 6.f * kGeluTanhScale * kGeluTanhCubic;

__device__ __forceinline__ float gelu(float z, bool use_tanh) {
  if (use_tanh) {
    // z * sigmoid(2u) = z * (v <= 0 ? 1 : m) / (1 + m)
    const float v = z * (kTanhC1 + kTanhC2 * (z * z));
    const float m = expf(-fabsf(v));
    return (z * (v <= 0.f ? 1.f : m)) / (1.f + m);
  }
  return z * normcdff(z);
}

__device__ __forceinline__ float gelu_grad(float z, bool use_tanh) {
  const float z2 = z * z;
  if (use_tanh) {
    // s + z * s (1 - s) * 2 du/dz, s = sigmoid(2u), s (1 - s) = m / (1 + m)^2
    const float v = z * (kTanhC1 + kTanhC2 * z2);
    const float m = expf(-fabsf(v));
    const float r = 1.f / (1.f + m);
    const float s = (v <= 0.f ? 1.f : m) * r;
    return s + (z * (m * r * r)) * (kTanhD1 + kTanhD2 * z2);
  }
  return normcdff(z) + z * (expf(-0.5f * z2) * kInvSqrt2Pi);
}

// sigmoid(g) = 1 / (1 + exp(-g)): 0 for g << 0 (exp overflows to inf), 1 for g >> 0.
__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// act(g) of act(gate) * up (`activation` is uniform across the grid: no divergence).
__device__ __forceinline__ float activate(float g, GatedActivation activation) {
  if (activation == GatedActivation::silu) return g * sigmoid(g);
  return gelu(g, activation == GatedActivation::gelu_tanh);
}

// act'(g); silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
__device__ __forceinline__ float activate_grad(float g, GatedActivation activation) {
  if (activation == GatedActivation::silu) {
    const float s = sigmoid(g);
    return s * (1.f + g * (1.f - s));
  }
  return gelu_grad(g, activation == GatedActivation::gelu_tanh);
}

// z = round_T(x + bias) for the kVec elements at x_at (bias: this thread's columns, or none).
template <typename T, int kVec>
__device__ __forceinline__ void load_z(const T* x_at, const float (&bias)[kVec], bool has_bias,
                                       float (&z)[kVec]) {
  load_floats<T, kVec>(x_at, z);
  if (has_bias) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) z[i] = to_float<T>(from_float<T>(z[i] + bias[i]));
  }
}

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

// The thread's vector of columns, or -1 past the row's end; its bias as floats (0 without bias).
template <typename T, int kVec>
__device__ __forceinline__ int64_t thread_columns(const void* bias_ptr, int64_t cols,
                                                  float (&bias)[kVec]) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (col >= cols) return -1;
  if (bias_ptr != nullptr) {
    load_floats<T, kVec>(static_cast<const T*>(bias_ptr) + col, bias);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) bias[i] = 0.f;
  }
  return col;
}

// y[row, col..col+kVec) = round_T(gelu(round_T(x + bias))), rows grid-stride.
template <typename T, int kVec>
__global__ void __launch_bounds__(256) bias_gelu_forward_kernel(const BiasGeluForwardParams p) {
  float bias[kVec];
  const int64_t col = thread_columns<T, kVec>(p.bias, p.cols, bias);
  if (col < 0) return;
  const bool has_bias = p.bias != nullptr;
  const bool use_tanh = p.approximate == GeluApproximation::tanh;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
       row += int64_t(gridDim.y) * blockDim.y) {
    const int64_t at = row * p.cols + col;
    float z[kVec];
    load_z<T, kVec>(x + at, bias, has_bias, z);
#pragma unroll
    for (int i = 0; i < kVec; ++i) z[i] = gelu(z[i], use_tanh);
    store_floats<T, kVec>(y + at, z);
  }
}

// dx[row, col..col+kVec) = round_T(dy * gelu'(round_T(x + bias))), rows grid-stride.
template <typename T, int kVec>
__global__ void __launch_bounds__(256) bias_gelu_backward_kernel(const BiasGeluBackwardParams p) {
  float bias[kVec];
  const int64_t col = thread_columns<T, kVec>(p.bias, p.cols, bias);
  if (col < 0) return;
  const bool has_bias = p.bias != nullptr;
  const bool use_tanh = p.approximate == GeluApproximation::tanh;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
       row += int64_t(gridDim.y) * blockDim.y) {
    const int64_t at = row * p.cols + col;
    float z[kVec];
    float g[kVec];
    load_z<T, kVec>(x + at, bias, has_bias, z);
    load_floats<T, kVec>(dy + at, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[i] *= gelu_grad(z[i], use_tanh);
    store_floats<T, kVec>(dx + at, g);
  }
}

// y[row, col..col+kVec) = round_T(act(g) * u), g = gate[row, col..], u = up[row, col..] (rows
// gate_row_stride / up_row_stride elements apart; y contiguous), rows grid-stride.
template <typename T, int kVec>
__global__ void __launch_bounds__(256) gated_mul_forward_kernel(const GatedMulForwardParams p) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (col >= p.cols) return;
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* y = static_cast<T*>(p.y);
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
       row += int64_t(gridDim.y) * blockDim.y) {
    float g[kVec];
    float u[kVec];
    load_floats<T, kVec>(gate + row * p.gate_row_stride + col, g);
    load_floats<T, kVec>(up + row * p.up_row_stride + col, u);
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[i] = activate(g[i], p.activation) * u[i];
    store_floats<T, kVec>(y + row * p.cols + col, g);
  }
}

// dup = round_T(dy * act(g)), dgate = round_T(dy * u * act'(g)), dy, dgate and dup contiguous,
// gate and up as in the forward; rows grid-stride.
template <typename T, int kVec>
__global__ void __launch_bounds__(256) gated_mul_backward_kernel(const GatedMulBackwardParams p) {
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (col >= p.cols) return;
  const T* dy = static_cast<const T*>(p.dy);
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
       row += int64_t(gridDim.y) * blockDim.y) {
    const int64_t at = row * p.cols + col;
    float d[kVec];
    float g[kVec];
    float u[kVec];
    load_floats<T, kVec>(dy + at, d);
    load_floats<T, kVec>(gate + row * p.gate_row_stride + col, g);
    load_floats<T, kVec>(up + row * p.up_row_stride + col, u);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float dgate_i = (d[i] * u[i]) * activate_grad(g[i], p.activation);
      u[i] = d[i] * activate(g[i], p.activation);  // dup
      g[i] = dgate_i;
    }
    store_floats<T, kVec>(dgate + at, g);
    store_floats<T, kVec>(dup + at, u);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: launch plan and dispatch
// ------------------------------------------------------------------------------------------------

constexpr int kBlockThreads = 256;
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

struct Plan {
  bool vectorized = false;
  dim3 grid;
  dim3 block;
};

// ptrs: every tensor pointer of the call (null ones ignored); row_strides: the row strides
// (elements) of the inputs that are not contiguous (ignored for a single row).
Plan plan_for(int64_t rows, int64_t cols, DType dtype, std::initializer_list<const void*> ptrs,
              std::initializer_list<int64_t> row_strides = {}) {
  Plan plan;
  const int vec = 16 / dtype_size(dtype);
  plan.vectorized = cols % vec == 0;
  for (const void* ptr : ptrs) {
    plan.vectorized = plan.vectorized && (ptr == nullptr || aligned_16(ptr));
  }
  if (rows > 1) {
    for (const int64_t stride : row_strides) plan.vectorized = plan.vectorized && stride % vec == 0;
  }
  const int64_t units = plan.vectorized ? cols / vec : cols;  // vectors (or elements) per row
  const int threads_x =
      static_cast<int>(std::min<int64_t>(kBlockThreads, ceil_div(units, 32) * 32));
  const int threads_y = kBlockThreads / threads_x;
  const int64_t grid_x = ceil_div(units, threads_x);
  // Enough blocks for 4 waves of resident blocks, fewer when the rows run out.
  const DeviceLimits limits = device_limits();
  const int64_t resident =
      int64_t(limits.sm_count) * std::max(1, limits.max_threads_per_sm / kBlockThreads);
  const int64_t grid_y = std::clamp<int64_t>(ceil_div(4 * resident, grid_x), 1,
                                             std::min(kMaxGridY, ceil_div(rows, threads_y)));
  plan.block = dim3(threads_x, threads_y);
  plan.grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  return plan;
}

}  // namespace

void bias_gelu_forward_launch(const BiasGeluForwardParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const Plan plan = plan_for(p.rows, p.cols, p.dtype, {p.x, p.bias, p.y});
  with_float_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    if (plan.vectorized) {
      bias_gelu_forward_kernel<T, kVec><<<plan.grid, plan.block, 0, stream>>>(p);
    } else {
      bias_gelu_forward_kernel<T, 1><<<plan.grid, plan.block, 0, stream>>>(p);
    }
  });
}

void bias_gelu_backward_launch(const BiasGeluBackwardParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const Plan plan = plan_for(p.rows, p.cols, p.dtype, {p.dy, p.x, p.bias, p.dx});
  with_float_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    if (plan.vectorized) {
      bias_gelu_backward_kernel<T, kVec><<<plan.grid, plan.block, 0, stream>>>(p);
    } else {
      bias_gelu_backward_kernel<T, 1><<<plan.grid, plan.block, 0, stream>>>(p);
    }
  });
}

void gated_mul_forward_launch(const GatedMulForwardParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const Plan plan = plan_for(p.rows, p.cols, p.dtype, {p.gate, p.up, p.y},
                             {p.gate_row_stride, p.up_row_stride});
  with_float_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    if (plan.vectorized) {
      gated_mul_forward_kernel<T, kVec><<<plan.grid, plan.block, 0, stream>>>(p);
    } else {
      gated_mul_forward_kernel<T, 1><<<plan.grid, plan.block, 0, stream>>>(p);
    }
  });
}

void gated_mul_backward_launch(const GatedMulBackwardParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const Plan plan = plan_for(p.rows, p.cols, p.dtype, {p.dy, p.gate, p.up, p.dgate, p.dup},
                             {p.gate_row_stride, p.up_row_stride});
  with_float_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    if (plan.vectorized) {
      gated_mul_backward_kernel<T, kVec><<<plan.grid, plan.block, 0, stream>>>(p);
    } else {
      gated_mul_backward_kernel<T, 1><<<plan.grid, plan.block, 0, stream>>>(p);
    }
  });
}

}  // namespace transfuse::cuda
