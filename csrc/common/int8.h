// Parameters of the int8 quantized matmul kernels. Shared by the CPU kernels, the CUDA kernels and
// the bindings; knows nothing of torch. All tensors are contiguous, row-major.
//
// Per-token (per-row) symmetric quantization of x [rows, cols], in fp32 with IEEE division:
//   absmax[i] = max_k |x[i, k]|
//   scale[i]  = absmax[i] / 127                  (1 where that is 0: zero or subnormal rows)
//   q[i, k]   = clamp(rint(x[i, k] / scale[i]), -127, 127)    (rint: round half to even)
// A row holding NaN or inf gets scale[i] = NaN and q[i, :] = 0, so that its w8a8 outputs are NaN
// (the reductions must not skip NaN, as fmaxf does: they compare the bit patterns of |x|).
//
// w8a8 linear, x_q [m, k] int8 with per-row scales s_x, w [n, k] int8 with per-output-channel
// scales s_w (symmetric, as quantized above along k):
//   acc[i, j] = sum_k x_q[i, k] * w[j, k]        (int32, exact)
//   out[i, j] = round_out(float(acc[i, j]) * s_x[i] * s_w[j] + bias[j])   (fp32 epilogue)
//
// w8a16 (weight-only) linear, x [m, k] of dtype:
//   out[i, j] = round_out((sum_k float(x[i, k]) * float(w[j, k])) * s_w[j] + bias[j])
//
// round_out: conversion of the fp32 value to out_dtype (round to nearest even).
#pragma once

#include <cstdint>

#include "norm.h"  // DType, dtype_size

namespace transfuse {

struct QuantizeParams {
  const void* x = nullptr;  // [rows, cols], dtype
  int8_t* q = nullptr;      // [rows, cols]
  float* scale = nullptr;   // [rows]
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::f32;
  int num_threads = 1;      // CPU only: OpenMP threads to use
};

struct Int8LinearParams {
  // w8a8: x_q and x_scale; w8a16: x (of dtype). The other pair is null.
  const int8_t* x_q = nullptr;    // [m, k]
  const float* x_scale = nullptr; // [m]
  const void* x = nullptr;        // [m, k], dtype
  const int8_t* w = nullptr;      // [n, k]
  const float* w_scale = nullptr; // [n]
  const void* bias = nullptr;     // [n], dtype, or null
  void* out = nullptr;            // [m, n], dtype
  int32_t* acc = nullptr;         // w8a8 only: when set, acc [m, n] is written instead of out
                                  // (the raw int32 product; scales and bias are then unused)
  const int8_t* w_packed = nullptr;  // CPU w8a8 only: w's panels as cpu::pack_weight_vnni (or,
                                     // on AVX2, pack_weight_int8_avx2) packs them (kept between
                                     // calls), or null: packed per call
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  DType dtype = DType::f32;       // of x (w8a16), bias and out
  int num_threads = 1;            // CPU only: OpenMP threads to use
};

}  // namespace transfuse
