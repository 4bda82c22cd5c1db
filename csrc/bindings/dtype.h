// The torch dtype -> kernel DType mapping shared by the binding files.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "../common/norm.h"

namespace transfuse {

inline DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t);
  }
}

}  // namespace transfuse
