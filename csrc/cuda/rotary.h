// CUDA kernel of the rotary position embedding (RoPE, "rotate half"). The math is stated in
// common/rotary.h. Launch errors stay for the caller's cudaGetLastError.
#pragma once

#include <cuda_runtime.h>

#include "../common/rotary.h"

namespace transfuse::cuda {

// q_out and k_out (contiguous [B, H, S, D]) from q, k, cos and sin in one launch: the forward
// rotation, or its transpose when p.inverse. Nothing for batch, seq or q_heads + k_heads 0; the
// tensors of a side with 0 heads are not touched (their pointers may be null).
void rotary_launch(const RotaryParams& p, cudaStream_t stream);

}  // namespace transfuse::cuda
