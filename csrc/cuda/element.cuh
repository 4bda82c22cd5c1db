// The element types of the CUDA kernels (float, __half, __nv_bfloat16): choosing one from a DType,
// and fp32 <-> element conversions rounding to nearest even.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../common/norm.h"  // DType

namespace transfuse::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// fn(TypeTag<T>{}) with T the C++ type of dtype (host side, to instantiate a kernel per dtype).
template <typename Fn>
void with_float_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f16: fn(TypeTag<__half>{}); break;
    case DType::bf16: fn(TypeTag<__nv_bfloat16>{}); break;
    default: fn(TypeTag<float>{}); break;
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(value);
  } else {
    return __bfloat162float(value);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(value);
  } else {
    return __float2bfloat16_rn(value);
  }
}

}  // namespace transfuse::cuda
