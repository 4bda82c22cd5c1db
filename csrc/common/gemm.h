// Parameters of the CPU GEMMs with their epilogue (cpu/gemm.cpp: fp32, which runs transfuse's
// fp32 linear, the w8a16 linear beyond a few rows and, on CPUs without an int8 dot product, w8a8;
// cpu/gemm_bf16.cpp: bf16 x and w). Knows nothing of torch. All tensors contiguous, row-major.
// x [m, k] fp32 (gemm) or bf16 (gemm_bf16), w [n, k] fp32 or int8 (gemm) or bf16 (gemm_bf16),
// x_scale [m], w_scale [n] and bias [n] fp32 or null:
//   out[i, j] = round_out(act((sum_k float(x[i, k]) * float(w[j, k])) * x_scale[i] * w_scale[j]
//                             + bias[j]))
// (x_scale[i] = w_scale[j] = 1 and bias[j] = 0 where null; the sum in fp32, in an order of the
// kernel's; the products of bf16 values are exact in fp32; act: none, or GELU as
// common/activation.h states it, in fp32).
#pragma once

#include <cstdint>

#include "activation.h"  // GeluApproximation
#include "norm.h"        // DType

namespace transfuse {

struct GemmParams {
  const void* x = nullptr;         // [m, k], fp32 (gemm) or bf16 (gemm_bf16)
  const void* w = nullptr;         // [n, k], int8 if w_int8, else fp32 (gemm) or bf16 (gemm_bf16)
  const void* w_packed = nullptr;  // w's panels packed before (cpu/gemm.h), or null
  bool w_int8 = false;
  const float* x_scale = nullptr;  // [m] or null (w8a8's per-token scales; not gemm_bf16)
  const float* w_scale = nullptr;  // [n] or null
  const float* bias = nullptr;     // [n] or null
  void* out = nullptr;             // [m, n], dtype
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  DType dtype = DType::f32;        // of out
  bool gelu = false;               // act = GELU (approximate) rather than none
  GeluApproximation approximate = GeluApproximation::none;
  int num_threads = 1;             // OpenMP threads to use
};

}  // namespace transfuse
