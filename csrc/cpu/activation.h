// CPU kernels of the bias + GELU epilogue and of act(gate) * up: OpenMP over rows (tiles of
// rows), vectorized loops. The math is stated in common/activation.h.
#pragma once

#include "../common/activation.h"

namespace transfuse::cpu {

// y = gelu(x + bias)
void bias_gelu_forward(const BiasGeluForwardParams& p);

// dx = dy * gelu'(x + bias)  (dbias, the sum of dx over rows, is the caller's)
void bias_gelu_backward(const BiasGeluBackwardParams& p);

// y = act(gate) * up
void gated_mul_forward(const GatedMulForwardParams& p);

// dgate, dup of y = act(gate) * up
void gated_mul_backward(const GatedMulBackwardParams& p);

// y[0, n) = gelu(z[0, n)) in fp32 (z and y distinct): the GEMMs' GELU epilogue.
void gelu_row(const float* z, float* y, int64_t n, GeluApproximation approximate);

}  // namespace transfuse::cpu
