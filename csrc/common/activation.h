// Parameters of the activation kernels: the bias + GELU epilogue (what BERT's intermediate layer
// computes after its GEMM) and act(gate) * up (a gated MLP: SwiGLU in Llama, Mistral, Qwen2;
// GeGLU in ModernBERT, exact GELU, and Gemma, tanh GELU).
// Shared by the CPU kernels, the CUDA kernels and the bindings; knows nothing of torch.
//
// Forward, elementwise over a contiguous [rows, cols] x, bias [cols] optional:
//   z = round_x(x + bias)            (z = x without bias; rounded to x's dtype, as eager's add)
//   y = round_x(gelu(z))             (gelu in fp32, one rounding at the end)
//   none: gelu(z) = z * Phi(z),  Phi(z) = 0.5 * (1 + erf(z / sqrt 2))        (F.gelu's default)
//   tanh: gelu(z) = 0.5 * z * (1 + tanh(u)),  u = sqrt(2 / pi) * (z + 0.044715 * z^3)
// Backward (z recomputed from x and bias):
//   dx = round_x(dy * gelu'(z)) = dz;  dbias = sum of dz over rows (a torch sum, ops/activation.py)
//   none: gelu'(z) = Phi(z) + z * phi(z),  phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
//   tanh: gelu'(z) = 0.5 * (1 + tanh(u)) + 0.5 * z * (1 - tanh(u)^2) * du/dz,
//         du/dz = sqrt(2 / pi) * (1 + 3 * 0.044715 * z^2)
// The kernels evaluate tanh through the logistic function, with v = -2u:
//   0.5 * (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(v))  (exp(v) = inf for z << 0 gives 0: the limit)
// and, free of overflow and cancellation, with m = exp(-|v|) <= 1:
//   sigmoid(2u) = (v <= 0 ? 1 : m) / (1 + m),  sigmoid(2u) * (1 - sigmoid(2u)) = m / (1 + m)^2
//   0.25 * (1 - tanh(u)^2) = sigmoid(2u) * (1 - sigmoid(2u))
//
// act(gate) * up, elementwise over [rows, cols] gate and up (each row contiguous, rows
// gate_row_stride / up_row_stride elements apart: they may be the two halves of one joint
// gate-up GEMM's output), in fp32, rounded once to the dtype (eager rounds act(gate) first, then
// the product: within an ulp of this):
//   y = act(g) * u,  silu(g) = g * sigmoid(g),  sigmoid(g) = 1 / (1 + exp(-g)),  gelu as above
// Backward:
//   dup = round(dy * act(g)),  dgate = round(dy * u * act'(g)),
//   silu'(g) = s * (1 + g * (1 - s)) with s = sigmoid(g),  gelu' as above
#pragma once

#include <cstdint>

#include "norm.h"  // DType

namespace transfuse {

enum class GeluApproximation : int32_t { none = 0, tanh = 1 };

// act of act(gate) * up: SiLU, GELU (erf) or GELU's tanh approximation.
enum class GatedActivation : int32_t { silu = 0, gelu = 1, gelu_tanh = 2 };

// sqrt(2 / pi) and the cubic coefficient of the tanh approximation (F.gelu's constants).
constexpr float kGeluTanhScale = 0.7978845608028654f;
constexpr float kGeluTanhCubic = 0.044715f;

struct BiasGeluForwardParams {
  const void* x = nullptr;     // [rows, cols], dtype
  const void* bias = nullptr;  // [cols], dtype, or null (no bias)
  void* y = nullptr;           // [rows, cols], dtype
  int64_t rows = 0;
  int64_t cols = 0;
  GeluApproximation approximate = GeluApproximation::none;
  DType dtype = DType::f32;
  int num_threads = 1;         // CPU only: OpenMP threads to use
};

struct BiasGeluBackwardParams {
  const void* dy = nullptr;    // [rows, cols], dtype: gradient of y
  const void* x = nullptr;     // [rows, cols], dtype: the forward's input
  const void* bias = nullptr;  // [cols], dtype, or null
  void* dx = nullptr;          // [rows, cols], dtype: dz = dy * gelu'(z)
  int64_t rows = 0;
  int64_t cols = 0;
  GeluApproximation approximate = GeluApproximation::none;
  DType dtype = DType::f32;
  int num_threads = 1;         // CPU only
};

struct GatedMulForwardParams {
  const void* gate = nullptr;   // [rows, cols], dtype, rows gate_row_stride elements apart
  const void* up = nullptr;     // [rows, cols], dtype, rows up_row_stride elements apart
  void* y = nullptr;            // [rows, cols], dtype, contiguous
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t gate_row_stride = 0;
  int64_t up_row_stride = 0;
  GatedActivation activation = GatedActivation::silu;
  DType dtype = DType::f32;
  int num_threads = 1;          // CPU only
};

struct GatedMulBackwardParams {
  const void* dy = nullptr;     // [rows, cols], dtype, contiguous: gradient of y
  const void* gate = nullptr;   // as in the forward
  const void* up = nullptr;
  void* dgate = nullptr;        // [rows, cols], dtype, contiguous
  void* dup = nullptr;          // [rows, cols], dtype, contiguous
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t gate_row_stride = 0;
  int64_t up_row_stride = 0;
  GatedActivation activation = GatedActivation::silu;
  DType dtype = DType::f32;
  int num_threads = 1;          // CPU only
};

}  // namespace transfuse
