// Conversions between the kernels' storage dtypes (fp32, fp16, bf16) and fp32 rows, shared by the
// CPU kernels. Rounding is to nearest even everywhere, bit-exact with torch's conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/norm.h"  // DType

namespace transfuse::cpu {

// The bits of a float and back (memcpy: no aliasing rules broken; compiles to a register move).
inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// The address of element `index` of an array of `dtype` at base (const stays const).
template <typename Pointer>
Pointer element_address(Pointer base, DType dtype, int64_t index) {
  using Byte =
      std::conditional_t<std::is_const_v<std::remove_pointer_t<Pointer>>, const char, char>;
  return static_cast<Byte*>(base) + index * dtype_size(dtype);
}

// dst = float(src), src of dtype `dtype`.
void load_row(const void* src, DType dtype, float* dst, int64_t n);

// dst = dtype(src), rounded to nearest even.
void store_row(const float* src, DType dtype, void* dst, int64_t n);

// values = round_dtype(values): converted to `dtype` and back (a no-op for f32).
void round_row(float* values, DType dtype, int64_t n);

}  // namespace transfuse::cpu
