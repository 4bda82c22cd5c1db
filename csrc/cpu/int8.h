// CPU kernels of the int8 quantized matmul: fused per-token quantization, the dequantizing
// epilogue of an int32 product, the weight-only (w8a16) GEMV for a few rows and the int8 x int8
// GEMV of one token; the int8 x int8 GEMM with its epilogue for AVX512-VNNI is in int8_vnni.cpp.
// Elsewhere the int8 x int8 GEMM of more rows is oneDNN's (torch._int_mm, called by the binding).
// The math is in common/int8.h.
#pragma once

#include <vector>

#include "../common/int8.h"

namespace transfuse::cpu {

void quantize_per_token(const QuantizeParams& p);

// The bias of a call in fp32 for the int8 GEMMs' epilogues (empty without one, or for raw sums
// into p.acc).
std::vector<float> fp32_bias(const Int8LinearParams& p);

// out = acc * s_x * s_w + bias (p.x_q / p.x are unused; p.acc is the int32 product to read).
void dequantize_accumulators(const Int8LinearParams& p);

// w8a16 for any m, fastest for the few rows of decoding: each int8 weight row is read once and
// multiplied with every row of x.
void int8_linear_w8a16(const Int8LinearParams& p);

// out [rows, k] = float(w [rows, k]) * w_scale[row]: the dequantized weights of w8a16 for the
// fp32 GEMM that runs it beyond a few rows.
void dequantize_weight(const int8_t* w, const float* w_scale, int64_t rows, int64_t k, float* out,
                       int num_threads);

// The int32 product acc [m, n] = x_q [m, k] w [n, k]^T of a few tokens (p.m <= kInt8GemvMaxRows;
// p.x_q, p.w, p.acc, p.n, p.k), exact, the weights read once. Returns false, writing nothing, on a
// CPU without AVX2 or for more tokens (the caller then uses another GEMM).
constexpr int64_t kInt8GemvMaxRows = 15;
bool int8_gemv(const Int8LinearParams& p);

// w8a8 on AVX512-VNNI: out (or, where p.acc is set, the raw int32 product acc) from p.x_q,
// p.x_scale, p.w, p.w_scale and p.bias, exact in int32. Returns false, writing nothing, on a CPU
// without AVX512-VNNI (or with TRANSFUSE_CPU_ISA below avx512).
bool int8_linear_vnni(const Int8LinearParams& p);
// The same for `count` calls on one x (the same m, k, x_q and x_scale; Q, K and V): x's rows
// offset once and the calls' panels shared by one team.
bool int8_linears_vnni(const Int8LinearParams* ps, int64_t count);

// w8a8 on AVX2 without an int8 dot product (int8_avx2.cpp): the same, exact in int32 through
// vpmaddubsw on |x_q| and w with x_q's sign, p.w_packed as pack_weight_int8_avx2 lays it out, or
// null: packed per call. Returns false, writing nothing, on other CPUs (AVX-512, an int8 dot
// product, no AVX2, or TRANSFUSE_CPU_ISA=baseline) and for a weight holding -128.
bool int8_linear_avx2(const Int8LinearParams& p);
// Whether it runs on this CPU (AVX2 with FMA, as vector_isa() sees it, without AVX-512 or an int8
// dot product).
bool has_int8_avx2();
// Its packed strips of a weight w [n, k], kept between calls: their bytes, 0 where it does not
// run; the packing (false, writing nothing, there or where w holds -128).
int64_t packed_weight_bytes_int8_avx2(int64_t n, int64_t k);
bool pack_weight_int8_avx2(const int8_t* w, int64_t n, int64_t k, int8_t* packed,
                           int num_threads);

// The VNNI GEMM's packed panels of a weight w [n, k], kept between calls (p.w_packed): their bytes;
// whether a call of m rows of x would read them if packed before (rather than run the GEMV or
// AMX, which read the weights as stored); the packing (false, writing nothing, where
// int8_linear_vnni would not run).
int64_t packed_weight_bytes(int64_t n, int64_t k);
bool int8_vnni_packs(int64_t m, int64_t k);
bool pack_weight_vnni(const int8_t* w, int64_t n, int64_t k, int8_t* packed, int num_threads);

// Whether this CPU has an int8 dot-product instruction (x86: AVX512-VNNI or AVX-VNNI), which
// oneDNN's int8 GEMM needs to be fast; true off x86.
bool has_int8_dot();

}  // namespace transfuse::cpu
