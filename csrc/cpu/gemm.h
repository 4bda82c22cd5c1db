// The CPU fp32 GEMM with its epilogue (the math is in common/gemm.h).
#pragma once

#include "../common/gemm.h"

namespace transfuse::cpu {

// Runs p on AVX-512 and returns true; returns false, writing nothing, on a CPU without AVX-512
// (or with TRANSFUSE_CPU_ISA below avx512), where the caller uses torch's GEMM.
bool gemm(const GemmParams& p);

// Whether gemm runs on this CPU (AVX-512 with BW and VL, as vector_isa() sees it).
bool has_gemm();

}  // namespace transfuse::cpu
