// CUDA kernels for fused (residual add +) LayerNorm / RMSNorm. The math is stated in common/norm.h.
#pragma once

#include <cuda_runtime.h>

#include "../common/norm.h"

namespace transfuse::cuda {

void norm_forward_launch(const NormForwardParams& p, cudaStream_t stream);

// Floats of device scratch norm_backward_launch needs (partial sums of dweight and dbias).
int64_t norm_backward_workspace_floats(const NormBackwardParams& p);

void norm_backward_launch(const NormBackwardParams& p, float* workspace, cudaStream_t stream);

}  // namespace transfuse::cuda
