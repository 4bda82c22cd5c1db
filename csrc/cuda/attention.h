// CUDA attention forward on tensor cores (mma.sync, sm_80+, fp16/bf16), with a split-KV path
// for decoding (few query rows, many keys) that combines partial results. The math is stated in
// common/attention.h. Both layouts: padded [batch, heads, seq, head_dim] and packed ("varlen",
// cu_seqlens_q / cu_seqlens_k set), on every path. The backward pass on GPU is the Triton kernel's.
#pragma once

#include <cuda_runtime.h>

#include "../common/attention.h"

namespace transfuse::cuda {

// Empty when the kernels take these params; else why not (the caller then uses another backend).
const char* attention_forward_unsupported(const AttentionParams& p);

// Floats of device scratch attention_forward_launch needs (the split-KV partial outputs and
// their log-sum-exps; 0 when it does not split).
int64_t attention_forward_workspace_floats(const AttentionParams& p);

void attention_forward_launch(const AttentionParams& p, float* workspace, cudaStream_t stream);

}  // namespace transfuse::cuda
