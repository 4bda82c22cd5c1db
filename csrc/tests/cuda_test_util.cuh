// Helpers shared by the CUDA kernel tests: error checks, dtype names and 16-bit conversions on
// the host, a seedable random number generator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/norm.h"  // DType

namespace transfuse::test {

using transfuse::DType;

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(status));
    std::exit(1);
  }
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    default: return "f32";
  }
}

inline uint16_t to_bits(float value, DType t) {
  uint16_t bits;
  if (t == DType::f16) {
    const __half h = __float2half_rn(value);
    std::memcpy(&bits, &h, 2);
  } else {
    const __nv_bfloat16 h = __float2bfloat16_rn(value);
    std::memcpy(&bits, &h, 2);
  }
  return bits;
}

inline float from_bits(uint16_t bits, DType t) {
  if (t == DType::f16) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return __bfloat162float(__nv_bfloat16(raw));
}

inline float round_to(float value, DType t) {
  return t == DType::f32 ? value : from_bits(to_bits(value, t), t);
}

// splitmix64: fast, seedable, good enough for test data.
struct Rng {
  uint64_t state;
  float uniform(float lo, float hi) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return lo + (hi - lo) * static_cast<float>(static_cast<double>(z >> 40) * 0x1p-24);
  }
};

}  // namespace transfuse::test
