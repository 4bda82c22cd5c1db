// TRANSFUSE_MULTIVERSION compiles a function three times (AVX-512, AVX2, baseline x86-64; GCC
// target_clones) and the loader picks one per CPU. Elsewhere it is empty.
// Kernels written with intrinsics (target("avx512f") / target("avx2") functions) dispatch on
// vector_isa() instead: the best the CPU has, or a lower one named by the environment variable
// TRANSFUSE_CPU_ISA ("avx2" or "baseline"; "avx512" keeps AVX-512 but not AMX, amx.h), so that
// one machine tests every path.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define TRANSFUSE_X86_MULTIVERSION 1
#define TRANSFUSE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
// Intrinsics kernels on AVX-512 with byte/word ops and 128/256-bit masks (the fp32 / bf16 GEMM and
// GEMV: gemm.h's has_gemm).
#define TRANSFUSE_AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))
// Intrinsics kernels on AVX2 with FMA (the GEMV where AVX-512 is not there).
#define TRANSFUSE_AVX2_FMA __attribute__((target("avx2,fma")))

#include <cstdlib>
#include <cstring>

namespace transfuse::cpu {

enum class VectorIsa { baseline, avx2, avx512 };

inline VectorIsa vector_isa() {
  static const VectorIsa isa = [] {
    const VectorIsa best = __builtin_cpu_supports("avx512f") ? VectorIsa::avx512
                           : __builtin_cpu_supports("avx2")  ? VectorIsa::avx2
                                                             : VectorIsa::baseline;
    const char* asked = std::getenv("TRANSFUSE_CPU_ISA");
    if (asked != nullptr && std::strcmp(asked, "baseline") == 0) return VectorIsa::baseline;
    if (asked != nullptr && std::strcmp(asked, "avx2") == 0 && best == VectorIsa::avx512)
      return VectorIsa::avx2;
    return best;
  }();
  return isa;
}

// vector_isa() is AVX-512 and the CPU has its byte / word (BW) and 128 / 256-bit (VL) forms.
inline bool has_avx512bw_vl() {
  static const bool has = vector_isa() == VectorIsa::avx512 && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

}  // namespace transfuse::cpu
#else
#define TRANSFUSE_MULTIVERSION
#endif
