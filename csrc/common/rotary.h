// Parameters of the rotary position embedding kernels (RoPE, the "rotate half" layout of Llama,
// Mistral, Qwen2, Gemma: transformers' apply_rotary_pos_emb). Shared by the CPU kernels, the CUDA
// kernels and the bindings; knows nothing of torch.
//
// For q [B, Hq, S, D] and k [B, Hk, S, D] (any strides but a contiguous last dimension: the
// transposed views of the projections' [B, S, H, D] outputs), cos and sin [Bc, S, D] with Bc 1
// (shared by the batch) or B, D even, h = D / 2, every row x of q and k at (b, s), c = cos[b, s],
// n = sin[b, s], in fp32 and rounded once to the dtype:
//   forward:  out[i] = x[i] * c[i] - x[i + h] * n[i]        (i <  h)
//             out[i] = x[i] * c[i] + x[i - h] * n[i]        (i >= h)
//             i.e. x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[h:], x[:h]]
//   inverse:  the transpose of that linear map, the backward (dq from dq_out):
//             out[i] = x[i] * c[i] + x[i + h] * n[i + h]    (i <  h)
//             out[i] = x[i] * c[i] - x[i - h] * n[i - h]    (i >= h)
//             (with transformers' cos and sin, whose halves repeat, the rotation by -angle)
// Outputs are contiguous [B, Hq, S, D] and [B, Hk, S, D].
#pragma once

#include <cstdint>

#include "norm.h"  // DType

namespace transfuse {

struct RotaryParams {
  const void* q = nullptr;     // [batch, q_heads, seq, head_dim], dtype
  const void* k = nullptr;     // [batch, k_heads, seq, head_dim], dtype
  const void* cos = nullptr;   // [batch or 1, seq, head_dim], dtype
  const void* sin = nullptr;   // [batch or 1, seq, head_dim], dtype
  void* q_out = nullptr;       // [batch, q_heads, seq, head_dim], dtype, contiguous
  void* k_out = nullptr;       // [batch, k_heads, seq, head_dim], dtype, contiguous
  // element strides of the batch, head and position dimensions (the last dimension's is 1)
  int64_t q_strides[3] = {0, 0, 0};
  int64_t k_strides[3] = {0, 0, 0};
  // element strides of cos's and sin's batch (0 when shared by the batch) and position dimensions
  int64_t cos_strides[2] = {0, 0};
  int64_t sin_strides[2] = {0, 0};
  int64_t batch = 0;
  int64_t q_heads = 0;
  int64_t k_heads = 0;
  int64_t seq = 0;
  int64_t head_dim = 0;        // even
  bool inverse = false;        // the backward's transpose (above)
  DType dtype = DType::f32;
  int num_threads = 1;         // CPU only: OpenMP threads to use
};

}  // namespace transfuse
