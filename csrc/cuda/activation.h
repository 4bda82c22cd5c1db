// CUDA kernels of the bias + GELU epilogue and of SiLU(gate) * up. The math is stated in
// common/activation.h. Launch errors stay for the caller's cudaGetLastError.
#pragma once

#include <cuda_runtime.h>

#include "../common/activation.h"

namespace transfuse::cuda {

// y = gelu(x + bias)
void bias_gelu_forward_launch(const BiasGeluForwardParams& p, cudaStream_t stream);

// dx = dy * gelu'(x + bias)  (dbias, the sum of dx over rows, is the caller's)
void bias_gelu_backward_launch(const BiasGeluBackwardParams& p, cudaStream_t stream);

// y = silu(gate) * up (gate and up rows strided, y contiguous); nothing for rows or cols 0
void silu_mul_forward_launch(const SiluMulForwardParams& p, cudaStream_t stream);

// dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * silu(gate), s = sigmoid(gate)
void silu_mul_backward_launch(const SiluMulBackwardParams& p, cudaStream_t stream);

}  // namespace transfuse::cuda
