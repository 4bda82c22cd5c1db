// CPU kernels of the int8 quantized matmul: fused per-token quantization, the dequantizing
// epilogue of an int32 product, the weight-only (w8a16) GEMV for a few rows and the int8 x int8
// GEMV of one token. The int8 x int8 GEMM of more rows is oneDNN's (torch._int_mm, called by the
// binding). The math is in common/int8.h.
#pragma once

#include "../common/int8.h"

namespace transfuse::cpu {

void quantize_per_token(const QuantizeParams& p);

// out = acc * s_x * s_w + bias (p.x_q / p.x are unused; p.acc is the int32 product to read).
void dequantize_accumulators(const Int8LinearParams& p);

// w8a16 for any m, fastest for the few rows of decoding: each int8 weight row is read once and
// multiplied with every row of x.
void int8_linear_w8a16(const Int8LinearParams& p);

// The int32 product acc [n] = w [n, k] x_q [k] of one token (p.m = 1; p.x_q, p.w, p.acc, p.n,
// p.k), exact. Returns false, writing nothing, on a CPU without AVX2 (the caller then uses
// oneDNN's GEMM).
bool int8_gemv(const Int8LinearParams& p);

// Whether this CPU has an int8 dot-product instruction (x86: AVX512-VNNI or AVX-VNNI), which
// oneDNN's int8 GEMM needs to be fast; true off x86.
bool has_int8_dot();

}  // namespace transfuse::cpu
