// CUDA kernels of the bias + GELU epilogue. The math is stated in common/activation.h.
#pragma once

#include <cuda_runtime.h>

#include "../common/activation.h"

namespace transfuse::cuda {

// y = gelu(x + bias)
void bias_gelu_forward_launch(const BiasGeluForwardParams& p, cudaStream_t stream);

// dx = dy * gelu'(x + bias)  (dbias, the sum of dx over rows, is the caller's)
void bias_gelu_backward_launch(const BiasGeluBackwardParams& p, cudaStream_t stream);

}  // namespace transfuse::cuda
