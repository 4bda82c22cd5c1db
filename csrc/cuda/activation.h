// CUDA kernels of the bias + GELU epilogue and of act(gate) * up (SiLU or GELU). The math is
// stated in common/activation.h. Launch errors stay for the caller's cudaGetLastError.
#pragma once

#include <cuda_runtime.h>

#include "../common/activation.h"

namespace transfuse::cuda {

// y = gelu(x + bias)
void bias_gelu_forward_launch(const BiasGeluForwardParams& p, cudaStream_t stream);

// dx = dy * gelu'(x + bias)  (dbias, the sum of dx over rows, is the caller's)
void bias_gelu_backward_launch(const BiasGeluBackwardParams& p, cudaStream_t stream);

// y = act(gate) * up (gate and up rows strided, y contiguous); nothing for rows or cols 0
void gated_mul_forward_launch(const GatedMulForwardParams& p, cudaStream_t stream);

// dgate = dy * up * act'(gate), dup = dy * act(gate)
void gated_mul_backward_launch(const GatedMulBackwardParams& p, cudaStream_t stream);

}  // namespace transfuse::cuda
