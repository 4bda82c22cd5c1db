// Parameters of the fused attention kernels (forward, backward, split-KV decode).
// Shared by the CPU kernels, the CUDA kernels and the binding; knows nothing of torch.
//
// Per batch b, query head h (its key/value head is h / (heads_q / heads_kv)), query row i, key j:
//   s[i,j]  = scale * <q[i], k[j]>
//   s[i,j]  = softcap * tanh(s[i,j] / softcap)             (only when softcap > 0)
//   s[i,j] += bias[b,h,i,j]                                 (additive mask, broadcast by strides)
//   s[i,j]  = -inf where key j is not visible:
//               a bool mask holds false there, or
//               causal and j > i + (seq_kv - seq_q)         (bottom-right aligned), or
//               window > 0 and |i + (seq_kv - seq_q) - j| >= window
//   p[i,:]  = softmax(s[i,:]);  p = 0 on a row where no key is visible (output row of zeros)
//   p_drop  = p * keep[i,j] / (1 - dropout_p)               (only when dropout_p > 0)
//   out[i]  = sum_j p_drop[i,j] v[j]
//   lse[i]  = log(sum_j exp(s[i,j]))  (natural log, fp32; +inf on a row with no visible key)
// The kernels compute this one key tile at a time with the online softmax (running max m and
// running sum l, rescaling the partial output when m grows), so no seq_q x seq_kv tensor exists.
// The CUDA kernels (fp16 / bf16 inputs) and the CPU's bf16 products (cpu/attention_bf16.h) round
// p_drop to the inputs' dtype for the product with v (l sums the fp32 p), as FlashAttention does.
//
// Backward, with P recomputed from s and lse (P = exp(s - lse)), dO the output gradient and
// delta[i] = <dO[i], out[i]>:
//   dV[j]   = sum_i P_drop[i,j] dO[i]
//   dP[i,j] = <dO[i], V[j]> * keep[i,j] / (1 - dropout_p)
//   dS[i,j] = P[i,j] (dP[i,j] - delta[i])         (the gradient of the bias, written when asked)
//   dS_raw  = dS * (1 - tanh^2(s_raw / softcap))  (only when softcap > 0; else dS)
//   dQ[i]   = scale * sum_j dS_raw[i,j] K[j],  dK[j] = scale * sum_i dS_raw[i,j] Q[i]
//   (dK, dV of a key/value head sum over the query heads sharing it.)
//
// Dropout: keep[i,j] = dropout_bits(seed, b * heads_q + h, i, j) >= dropout_threshold(p), a
// counter-based hash, so forward and backward (and reference.py) draw the same mask.
#pragma once

#include <cmath>
#include <cstdint>

#include "norm.h"  // DType, dtype_size

#if defined(__CUDACC__)
#define TRANSFUSE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TRANSFUSE_HOST_DEVICE inline
#endif

namespace transfuse {

enum class MaskKind : int32_t { none = 0, boolean = 1, additive = 2 };

// A 32-bit integer hash with good avalanche (the "lowbias32" constants of C. Wellons).
TRANSFUSE_HOST_DEVICE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The random word of one row: depends on the seed, the (batch, query head) index and the row.
TRANSFUSE_HOST_DEVICE uint32_t dropout_row_key(uint32_t seed, uint32_t batch_head, uint32_t row) {
  return hash32(seed ^ hash32(batch_head ^ hash32(row)));
}

// The random word of element (row, col): hash32(row_key + col * golden ratio), wrapping.
TRANSFUSE_HOST_DEVICE uint32_t dropout_bits(uint32_t row_key, uint32_t col) {
  return hash32(row_key + col * 0x9e3779b9u);
}

// keep iff bits >= threshold; threshold = round(p * 2^32), clamped to 2^32 - 1.
inline uint32_t dropout_threshold(float p) {
  const double t = std::nearbyint(static_cast<double>(p) * 4294967296.0);
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

// Strides are in elements. The last dimension of q, k, v, out (and of dq, dk, dv, dout) is
// contiguous (stride 1); the other dimensions may have any non-negative stride.
struct AttentionParams {
  const void* q = nullptr;     // [batch, heads_q, seq_q, head_dim], dtype
  const void* k = nullptr;     // [batch, heads_kv, seq_kv, head_dim], dtype
  const void* v = nullptr;     // [batch, heads_kv, seq_kv, head_dim], dtype
  void* out = nullptr;         // [batch, heads_q, seq_q, head_dim], dtype
  float* lse = nullptr;        // [batch, heads_q, seq_q] contiguous, or null (not needed)
  int64_t q_strides[3] = {0, 0, 0};    // batch, head, row
  int64_t k_strides[3] = {0, 0, 0};
  int64_t v_strides[3] = {0, 0, 0};
  int64_t out_strides[3] = {0, 0, 0};

  // Mask or bias, read as mask[b, h, i, j] with these strides (0 where it broadcasts).
  MaskKind mask_kind = MaskKind::none;
  const void* mask = nullptr;  // bool (1 byte, nonzero = attend) or additive of mask_dtype
  DType mask_dtype = DType::f32;
  int64_t mask_strides[4] = {0, 0, 0, 0};  // batch, head, row, col

  int64_t batch = 0;
  int64_t heads_q = 0;
  int64_t heads_kv = 0;        // divides heads_q
  int64_t seq_q = 0;
  int64_t seq_kv = 0;
  int64_t head_dim = 0;
  DType dtype = DType::f32;    // of q, k, v, out (and of dout, dq, dk, dv)

  float scale = 1.f;
  bool causal = false;
  int64_t window = 0;          // 0: no sliding window
  float softcap = 0.f;         // 0: no softcap
  float dropout_p = 0.f;       // 0: no dropout
  uint32_t dropout_seed = 0;

  // Packed ("varlen") layout, FlashAttention's varlen convention; off while cu_seqlens_q is null.
  // The rows of all sequences lie one after another: q and out are [total_q, heads_q, head_dim]
  // views (row stride = strides[2], head stride = strides[1], strides[0] unused and 0), k and v
  // [total_kv, heads_kv, head_dim]. Sequence b (batch = number of sequences) owns query rows
  // cu_seqlens_q[b] .. cu_seqlens_q[b+1] and keys cu_seqlens_k[b] .. cu_seqlens_k[b+1]; seq_q and
  // seq_kv are the largest such lengths (the grid's extent). Everything per sequence uses local
  // positions: causal / window alignment with that sequence's own lengths (offset len_kv - len_q),
  // the mask read at mask[b, h, i, j], dropout keyed by (b * heads_q + h, i, j). So a packed call
  // equals the padded call of each sequence alone. The lse is [heads_q, total_q]; in the backward
  // dq is [total_q, heads_q, head_dim] contiguous, dk / dv [total_kv, heads_kv, head_dim], and
  // dbias stays [batch, heads_q, seq_q, seq_kv] in local positions. Use the helpers below.
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1]: 0, non-decreasing, ends at total_q
  const int32_t* cu_seqlens_k = nullptr;  // [batch + 1]: 0, non-decreasing, ends at total_kv
  int64_t total_q = 0;
  int64_t total_kv = 0;

  int num_threads = 1;         // CPU only: OpenMP threads to use
};

// One sequence's rows in either layout: row i of sequence b is at b * strides[0] + h * strides[1]
// + (start + i) * strides[2] (start = 0 and length = seq_* in the padded layout).
struct SequenceSpan {
  int64_t q_start, q_len, kv_start, kv_len;
};

TRANSFUSE_HOST_DEVICE SequenceSpan sequence_span(const int32_t* cu_seqlens_q,
                                                 const int32_t* cu_seqlens_k, int64_t b,
                                                 int64_t seq_q, int64_t seq_kv) {
  if (cu_seqlens_q == nullptr) return {0, seq_q, 0, seq_kv};
  return {cu_seqlens_q[b], cu_seqlens_q[b + 1] - cu_seqlens_q[b], cu_seqlens_k[b],
          cu_seqlens_k[b + 1] - cu_seqlens_k[b]};
}

// Index of lse[b, h, i] (padded: [batch, heads_q, seq_q]; packed: [heads_q, total_q]).
TRANSFUSE_HOST_DEVICE int64_t lse_index(bool packed, int64_t b, int64_t h, int64_t start,
                                        int64_t i, int64_t heads_q, int64_t seq_q,
                                        int64_t total_q) {
  return packed ? h * total_q + start + i : (b * heads_q + h) * seq_q + i;
}

struct AttentionBackwardParams {
  AttentionParams forward;     // the forward's inputs; forward.out and forward.lse are read
  const void* dout = nullptr;  // [batch, heads_q, seq_q, head_dim], dtype
  int64_t dout_strides[3] = {0, 0, 0};
  // Outputs, contiguous: dq [batch, heads_q, seq_q, head_dim], dk/dv [batch, heads_kv, seq_kv,
  // head_dim], all of dtype; dbias [batch, heads_q, seq_q, seq_kv] fp32 (dS), or null.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dbias = nullptr;
};

}  // namespace transfuse
