// CPU kernels for fused (residual add +) LayerNorm / RMSNorm: OpenMP over rows, vectorized loops.
// The math is stated in common/norm.h.
#pragma once

#include "../common/norm.h"

namespace transfuse::cpu {

void norm_forward(const NormForwardParams& p);

// Floats of scratch norm_backward needs (per-thread partial sums of dweight and dbias).
int64_t norm_backward_workspace_floats(const NormBackwardParams& p);

void norm_backward(const NormBackwardParams& p, float* workspace);

}  // namespace transfuse::cpu
