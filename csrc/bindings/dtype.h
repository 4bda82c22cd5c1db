// The torch dtype -> kernel DType mapping and the GEMM bindings' activation argument, shared by
// the binding files.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "../common/activation.h"
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

// A GEMM epilogue's activation: "none", "gelu" (F.gelu's erf form) or "gelu_tanh".
struct Activation {
  bool gelu = false;
  GeluApproximation approximate = GeluApproximation::none;
};

inline Activation to_activation(c10::string_view activation) {
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu" || activation == "gelu_tanh",
                    "activation must be one of (None, 'gelu', 'gelu_tanh'), got '", activation,
                    "'");
  return {activation != "none",
          activation == "gelu_tanh" ? GeluApproximation::tanh : GeluApproximation::none};
}

}  // namespace transfuse
