// Binding of the attention kernels: tensor checks, allocation, registration as torch ops
// transfuse_C::attention_forward (CPU and CUDA) and transfuse_C::attention_backward (CPU; on GPU
// the backward pass is the Triton kernel's). python/transfuse/ops/attention.py validates user
// input first; these checks guard the kernels against anything that slips past it.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "dtype.h"

#include "../cpu/attention.h"

#ifdef TRANSFUSE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/attention.h"
#endif

namespace transfuse {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// [B, H, S, D] with a contiguous last dimension and q's dtype and device.
void check_heads(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4 && (t.size(3) <= 1 || t.stride(3) == 1), name,
                    " must be a 4-D tensor with a contiguous last dimension");
  TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(3) == q.size(3), name,
                    " must match q's batch and head_dim");
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on ", q.device());
}

void copy_strides(const Tensor& t, int64_t* strides) {
  for (int d = 0; d < 3; ++d) strides[d] = t.stride(d);
}

// Fills everything but the outputs.
AttentionParams forward_params(const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& mask, bool causal, double scale, int64_t window,
                               double softcap, double dropout_p, int64_t seed) {
  check_heads(q, "q", q);
  check_heads(k, "k", q);
  check_heads(v, "v", q);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "k's heads must divide q's heads");
  AttentionParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides(q, p.q_strides);
  copy_strides(k, p.k_strides);
  copy_strides(v, p.v_strides);
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.seq_q = q.size(2);
  p.seq_kv = k.size(2);
  p.head_dim = q.size(3);
  p.dtype = to_dtype(q.scalar_type(), "q");
  if (mask) {
    TORCH_CHECK_VALUE(mask->dim() == 4 && mask->size(0) == p.batch && mask->size(1) == p.heads_q
                          && mask->size(2) == p.seq_q && mask->size(3) == p.seq_kv,
                      "mask must be broadcast to [batch, heads_q, seq_q, seq_kv]");
    TORCH_CHECK_VALUE(mask->device() == q.device(), "mask must be on ", q.device());
    if (mask->scalar_type() == at::kBool) {
      p.mask_kind = MaskKind::boolean;
    } else {
      p.mask_kind = MaskKind::additive;
      p.mask_dtype = to_dtype(mask->scalar_type(), "mask");
    }
    p.mask = mask->data_ptr();
    for (int d = 0; d < 4; ++d) p.mask_strides[d] = mask->stride(d);
  }
  TORCH_CHECK_VALUE(window >= 0, "window must be >= 0");
  TORCH_CHECK_VALUE(softcap >= 0, "softcap must be >= 0");
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1)");
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.window = window;
  p.softcap = static_cast<float>(softcap);
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_seed = static_cast<uint32_t>(seed);
  return p;
}

// out is stored as [B, Sq, Hq, D] and returned as its [B, Hq, Sq, D] view, so that the
// transformers layout [B, Sq, Hq, D] is a free transpose away.
Tensor empty_output(const Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const OptTensor& mask, bool causal, double scale,
                                             int64_t window, double softcap, double dropout_p,
                                             int64_t seed) {
  AttentionParams p = forward_params(q, k, v, mask, causal, scale, window, softcap, dropout_p,
                                     seed);
  Tensor out = empty_output(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  copy_strides(out, p.out_strides);
  p.lse = lse.data_ptr<float>();
  if (q.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const char* unsupported = cuda::attention_forward_unsupported(p);
    TORCH_CHECK_VALUE(unsupported[0] == '\0', "the CUDA attention kernel cannot run this call: ",
                      unsupported);
    const c10::cuda::CUDAGuard guard(q.device());
    Tensor workspace = at::empty({cuda::attention_forward_workspace_floats(p)},
                                 q.options().dtype(at::kFloat));
    cuda::attention_forward_launch(p, workspace.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    p.num_threads = at::get_num_threads();
    cpu::attention_forward(p);
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const OptTensor& mask, bool causal, double scale, int64_t window,
    double softcap, double dropout_p, int64_t seed, bool bias_grad) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attention_backward of transfuse_C runs on CPU tensors");
  AttentionBackwardParams p;
  p.forward = forward_params(q, k, v, mask, causal, scale, window, softcap, dropout_p, seed);
  check_heads(out, "out", q);
  check_heads(dout, "dout", q);
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && dout.sizes() == q.sizes(),
                    "out and dout must have q's shape");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.is_contiguous()
                        && lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
                    "lse must be a contiguous float32 [batch, heads_q, seq_q] tensor");
  p.forward.out = const_cast<void*>(out.data_ptr());
  copy_strides(out, p.forward.out_strides);
  p.forward.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr();
  copy_strides(dout, p.dout_strides);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor dbias = bias_grad ? at::empty({q.size(0), q.size(1), q.size(2), k.size(2)},
                                       q.options().dtype(at::kFloat))
                           : at::empty({0}, q.options().dtype(at::kFloat));
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dbias = bias_grad ? dbias.data_ptr<float>() : nullptr;
  p.forward.num_threads = at::get_num_threads();
  cpu::attention_backward(p);
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transfuse_C, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale, "
        "int window, float softcap, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? mask, bool causal, float scale, int window, float softcap, float dropout_p, "
        "int seed, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(transfuse_C, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}

#ifdef TRANSFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(transfuse_C, CUDA, m) {
  m.impl("attention_forward", &attention_forward);
}
#endif

}  // namespace transfuse
