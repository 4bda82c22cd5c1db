// The CPU GEMMs with their epilogue (the math is in common/gemm.h).
#pragma once

#include <cstdint>

#include "../common/gemm.h"

namespace transfuse::cpu {

// Runs p and returns true on AVX-512 and on AVX2 with FMA; returns false, writing nothing,
// elsewhere (or with TRANSFUSE_CPU_ISA below the ISA needed), where the caller uses torch's GEMM.
bool gemm(const GemmParams& p);

// Whether gemm runs on this CPU for any number of rows (AVX-512 with BW and VL, as vector_isa()
// sees it).
bool has_gemm();

// The most rows of x gemm takes on this CPU: any (INT64_MAX) on AVX-512 and on AVX2 with FMA,
// none elsewhere.
int64_t gemm_max_rows();

// gemm's packed panels of an fp32 weight w [n, k], kept between calls (p.w_packed; not for int8
// weights): their bytes; the packing (false, writing nothing, where gemm would not run).
int64_t packed_weight_bytes_fp32(int64_t n, int64_t k);
bool pack_weight_fp32(const float* w, int64_t n, int64_t k, void* packed, int num_threads);

// On AVX2 (not AVX-512), gemm's panels of an int8 weight kept packed as int8 (p.w_packed with
// p.w_int8; widened to fp32 as the tiles load them, so a call streams a quarter of the fp32
// panels' bytes): their bytes, 0 where gemm would not read them; the packing (false, writing
// nothing, there).
int64_t packed_weight_bytes_int8_strips(int64_t n, int64_t k);
bool pack_weight_int8_strips(const int8_t* w, int64_t n, int64_t k, void* packed,
                             int num_threads);

// bf16 x and w (gemm_bf16.cpp): runs p with AVX512_BF16 dot products and returns true; returns
// false, writing nothing, on a CPU without AVX512_BF16 (or TRANSFUSE_CPU_ISA below avx512), or
// for p.x_scale.
bool gemm_bf16(const GemmParams& p);
bool has_gemm_bf16();

// gemm_bf16's packed panels of a bf16 weight w [n, k], kept between calls (p.w_packed): their
// bytes; the packing (false, writing nothing, where gemm_bf16 would not run).
int64_t packed_weight_bytes_bf16(int64_t n, int64_t k);
bool pack_weight_bf16(const uint16_t* w, int64_t n, int64_t k, void* packed, int num_threads);

// An int8 weight's panels for gemm_bf16 (w8a16 of bf16 x), kept packed as int8 (p.w_packed with
// p.w_int8; widened to bf16 per call): their bytes; the packing (false, writing nothing, where
// gemm_bf16 would not run).
int64_t packed_weight_bytes_int8_pairs(int64_t n, int64_t k);
bool pack_weight_int8_pairs(const int8_t* w, int64_t n, int64_t k, void* packed,
                            int num_threads);

// A few rows of x (decoding; gemv.cpp): fp32 or bf16 x and w (not int8), weights read as stored.
// Runs p and returns true for p.m <= kGemvMaxRows on a CPU where has_gemv(); else false, writing
// nothing.
constexpr int64_t kGemvMaxRows = 15;
bool gemv(const GemmParams& p);
// Whether gemv runs on this CPU: AVX-512 (has_gemm) or AVX2 with FMA, as vector_isa() sees it.
bool has_gemv();

}  // namespace transfuse::cpu
