// Parameters of the fused (residual add +) LayerNorm / RMSNorm kernels.
// Shared by the CPU kernels, the CUDA kernels and the bindings; knows nothing of torch.
//
// Forward, per row i of a contiguous [rows, cols] input, all statistics in fp32:
//   h      = round_x(x + residual)            (h = x when residual is null; written to residual_out)
//   mean   = sum(h) / cols                    (LayerNorm; 0 for RMSNorm)
//   rstd   = 1 / sqrt(sum((h - mean)^2) / cols + eps), NaN where that sum (or + eps) overflows
//            fp32: the row's y is then NaN (as eager layer_norm gives), never zeros
//   x_hat  = round_normalized((h - mean) * rstd)   (rounding only where normalized_dtype != f32)
//   y      = round_out(x_hat * (weight_offset + weight) + bias)   (weight/bias optional)
// round_T means "convert to dtype T and back": the HF modules' casts, reproduced exactly.
//
// Backward, with g = dy * (weight_offset + weight) and x_hat recomputed from h, mean, rstd:
//   LayerNorm: dh = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
//   RMSNorm:   dh = rstd * (g - x_hat * mean(g * x_hat))
//   dx = dh + dresidual_out (the gradient reaching h through residual_out); dresidual = dx
//   dweight = sum over rows of dy * x_hat, dbias = sum over rows of dy
#pragma once

#include <cstdint>

namespace transfuse {

enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2 };

inline int dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

struct NormForwardParams {
  const void* x = nullptr;         // [rows, cols], x_dtype
  const void* residual = nullptr;  // [rows, cols], x_dtype, or null
  const void* weight = nullptr;    // [cols], weight_dtype, or null (no scale)
  const void* bias = nullptr;      // [cols], weight_dtype, or null (LayerNorm only)
  void* y = nullptr;               // [rows, cols], out_dtype
  void* residual_out = nullptr;    // [rows, cols], x_dtype: h = x + residual; written iff residual
  float* mean = nullptr;           // [rows] (LayerNorm only), or null: not written
  float* rstd = nullptr;           // [rows], or null: not written (no backward will need it)
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-5f;
  float weight_offset = 0.f;       // Gemma's (1 + weight)
  bool rms = false;                // RMSNorm: no mean subtraction, no bias
  DType x_dtype = DType::f32;
  DType weight_dtype = DType::f32;
  DType normalized_dtype = DType::f32;  // dtype x_hat is rounded to before the weight multiply
  DType out_dtype = DType::f32;
  int num_threads = 1;             // CPU only: OpenMP threads to use
};

struct NormBackwardParams {
  const void* dy = nullptr;             // [rows, cols], out_dtype
  const void* dresidual_out = nullptr;  // [rows, cols], x_dtype, or null
  const void* h = nullptr;              // [rows, cols], x_dtype: the normalized input
  const void* weight = nullptr;         // [cols], weight_dtype, or null
  const float* mean = nullptr;          // [rows] (LayerNorm only)
  const float* rstd = nullptr;          // [rows]
  void* dx = nullptr;                   // [rows, cols], x_dtype
  void* dweight = nullptr;              // [cols], weight_dtype, or null (no weight)
  void* dbias = nullptr;                // [cols], weight_dtype, or null (no bias)
  int64_t rows = 0;
  int64_t cols = 0;
  float weight_offset = 0.f;
  bool rms = false;
  DType x_dtype = DType::f32;
  DType weight_dtype = DType::f32;
  DType out_dtype = DType::f32;
  int num_threads = 1;                  // CPU only
};

}  // namespace transfuse
