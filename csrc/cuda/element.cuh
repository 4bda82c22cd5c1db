// The element types of the CUDA kernels (float, __half, __nv_bfloat16): choosing one from a DType,
// fp32 <-> element conversions rounding to nearest even, and vectors of kVec elements (one 16-byte
// load or store at most).
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

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vector {
  T values[kVec];
};

// kVec consecutive elements at ptr (aligned to sizeof(T) * kVec).
template <typename T, int kVec>
__device__ __forceinline__ Vector<T, kVec> load_vector(const T* ptr) {
  return *reinterpret_cast<const Vector<T, kVec>*>(ptr);
}

// The same as floats.
template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[kVec]) {
  const Vector<T, kVec> v = load_vector<T, kVec>(ptr);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float<T>(v.values[i]);
}

// kVec floats rounded to T, stored at ptr (aligned likewise).
template <typename T, int kVec>
__device__ __forceinline__ void store_floats(T* ptr, const float (&in)[kVec]) {
  Vector<T, kVec> v;
#pragma unroll
  for (int i = 0; i < kVec; ++i) v.values[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vector<T, kVec>*>(ptr) = v;
}

}  // namespace transfuse::cuda
