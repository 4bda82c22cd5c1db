// Binding of the attention kernels: tensor checks, allocation, and the functions
// transfuse._C.attention_forward and varlen_attention_forward (CPU and CUDA), attention_backward
// and varlen_attention_backward (CPU; on GPU the backward pass is the Triton kernel's). The
// varlen ops take FlashAttention's packed layout; both layouts share the checks and params.
// python/transfuse/ops/attention.py validates user input first; these checks guard the kernels
// against anything that slips past it.
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "dtype.h"
#include "python_functions.h"
#include "tensor_functions.h"

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

// The packed ("varlen") layout's extra inputs; see common/attention.h.
struct Packing {
  const Tensor& cu_seqlens_q;
  const Tensor& cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
};

// Padded [B, H, S, D] or packed [total, H, D], with a contiguous last dimension and q's dtype and
// device.
void check_heads(const Tensor& t, const char* name, const Tensor& q, bool packed) {
  const int64_t dims = packed ? 3 : 4;
  TORCH_CHECK_VALUE(t.dim() == dims && (t.size(dims - 1) <= 1 || t.stride(dims - 1) == 1), name,
                    " must be a ", dims, "-D tensor with a contiguous last dimension");
  TORCH_CHECK_VALUE(t.size(dims - 1) == q.size(dims - 1) && (packed || t.size(0) == q.size(0)),
                    name, " must match q's ", packed ? "head_dim" : "batch and head_dim");
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on ", q.device());
}

// Batch, head, row strides; the packed layout has no batch dimension (its rows are dimension 0).
void copy_strides(const Tensor& t, int64_t* strides, bool packed) {
  strides[0] = packed ? 0 : t.stride(0);
  strides[1] = t.stride(1);
  strides[2] = t.stride(packed ? 0 : 2);
}

// int32 offsets [batch + 1] on q's device.
void check_offsets(const Tensor& offsets, const char* name, const Tensor& q) {
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt, name, " must be int32, got ",
                   offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.is_contiguous(), name,
                    " must be a contiguous 1-D tensor of batch + 1 offsets");
  TORCH_CHECK_VALUE(offsets.device() == q.device(), name, " must be on ", q.device());
}

// Sequence lengths in [0, max_len]. On CPU the offsets are read too (O(batch)): 0, then
// non-decreasing by such lengths, ending at `total`, so that no row is addressed out of bounds; on
// CUDA that would cost a synchronization, and the Python layer has checked them.
void check_lengths(const Tensor& offsets, const char* name, int64_t total, int64_t max_len,
                   const char* max_name) {
  TORCH_CHECK_VALUE(max_len >= 0, max_name, " must be >= 0, got ", max_len);
  if (!offsets.device().is_cpu()) return;
  const int32_t* starts = offsets.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(starts[0] == 0, name, " must start at 0, got ", starts[0]);
  for (int64_t b = 0; b + 1 < offsets.size(0); ++b) {
    const int64_t length = int64_t(starts[b + 1]) - starts[b];
    TORCH_CHECK_VALUE(length >= 0 && length <= max_len, name,
                      " must be non-decreasing by at most ", max_name, " = ", max_len,
                      "; sequence ", b, " has length ", length);
  }
  TORCH_CHECK_VALUE(starts[offsets.size(0) - 1] == total, name, " must end at ", total,
                    " (the rows of the packed tensor), got ", starts[offsets.size(0) - 1]);
}

// Fills everything but the outputs, for the padded layout (packing null) or the packed one.
AttentionParams forward_params(const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& mask, bool causal, double scale, int64_t window,
                               double softcap, double dropout_p, int64_t seed,
                               const Packing* packing = nullptr) {
  const bool packed = packing != nullptr;
  check_heads(q, "q", q, packed);
  check_heads(k, "k", q, packed);
  check_heads(v, "v", q, packed);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "k's heads must divide q's heads");
  TORCH_CHECK_VALUE(q.size(-1) > 0, "q must have a non-empty head_dim");
  AttentionParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides(q, p.q_strides, packed);
  copy_strides(k, p.k_strides, packed);
  copy_strides(v, p.v_strides, packed);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.head_dim = q.size(-1);
  p.dtype = to_dtype(q.scalar_type(), "q");
  if (packed) {
    p.total_q = q.size(0);
    p.total_kv = k.size(0);
    check_offsets(packing->cu_seqlens_q, "cu_seqlens_q", q);
    check_offsets(packing->cu_seqlens_k, "cu_seqlens_k", q);
    TORCH_CHECK_VALUE(packing->cu_seqlens_k.size(0) == packing->cu_seqlens_q.size(0),
                      "cu_seqlens_k must have cu_seqlens_q's length (batch + 1)");
    check_lengths(packing->cu_seqlens_q, "cu_seqlens_q", p.total_q, packing->max_seqlen_q,
                  "max_seqlen_q");
    check_lengths(packing->cu_seqlens_k, "cu_seqlens_k", p.total_kv, packing->max_seqlen_k,
                  "max_seqlen_k");
    p.cu_seqlens_q = packing->cu_seqlens_q.data_ptr<int32_t>();
    p.cu_seqlens_k = packing->cu_seqlens_k.data_ptr<int32_t>();
    p.batch = packing->cu_seqlens_q.size(0) - 1;
    p.seq_q = packing->max_seqlen_q;
    p.seq_kv = packing->max_seqlen_k;
  } else {
    p.batch = q.size(0);
    p.seq_q = q.size(2);
    p.seq_kv = k.size(2);
  }
  if (mask) {
    TORCH_CHECK_VALUE(mask->dim() == 4 && mask->size(0) == p.batch && mask->size(1) == p.heads_q
                          && mask->size(2) == p.seq_q && mask->size(3) == p.seq_kv,
                      "mask must be broadcast to [batch, heads_q, ",
                      packed ? "max_seqlen_q, max_seqlen_k]" : "seq_q, seq_kv]");
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
  TORCH_CHECK_VALUE(scale > 0 && scale < INFINITY, "scale must be > 0 and finite");
  TORCH_CHECK_VALUE(softcap >= 0 && softcap < INFINITY, "softcap must be >= 0 and finite");
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1)");
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.window = window;
  p.softcap = static_cast<float>(softcap);
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_seed = static_cast<uint32_t>(seed);
  return p;
}

bool is_packed(const AttentionParams& p) { return p.cu_seqlens_q != nullptr; }

// The lse's shape: [batch, heads_q, seq_q], or [heads_q, total_q] packed.
std::vector<int64_t> lse_shape(const AttentionParams& p) {
  if (is_packed(p)) return {p.heads_q, p.total_q};
  return {p.batch, p.heads_q, p.seq_q};
}

// Padded: out is stored as [B, Sq, Hq, D] and returned as its [B, Hq, Sq, D] view, so that the
// transformers layout [B, Sq, Hq, D] is a free transpose away. Packed: [total_q, Hq, D] contiguous.
Tensor empty_output(const Tensor& q, bool packed) {
  if (packed) return at::empty(q.sizes(), q.options());
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

// Allocates out and lse and runs the forward kernel of q's device on p (all else filled).
std::tuple<Tensor, Tensor> run_forward(AttentionParams& p, const Tensor& q) {
  Tensor out = empty_output(q, is_packed(p));
  Tensor lse = at::empty(lse_shape(p), q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  copy_strides(out, p.out_strides, is_packed(p));
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

}  // namespace

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const OptTensor& mask, bool causal, double scale,
                                             int64_t window, double softcap, double dropout_p,
                                             int64_t seed) {
  AttentionParams p = forward_params(q, k, v, mask, causal, scale, window, softcap, dropout_p,
                                     seed);
  return run_forward(p, q);
}

std::tuple<Tensor, Tensor> varlen_attention_forward(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const OptTensor& mask,
    bool causal, double scale, int64_t window, double softcap, double dropout_p, int64_t seed) {
  const Packing packing{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  AttentionParams p = forward_params(q, k, v, mask, causal, scale, window, softcap, dropout_p,
                                     seed, &packing);
  return run_forward(p, q);
}

namespace {

// The CPU backward of p.forward (filled but for out and lse) in either layout: dq, dk, dv
// contiguous in q's shape and k's, dbias [batch, heads_q, seq_q, seq_kv] fp32 (local positions)
// when bias_grad, else empty.
std::tuple<Tensor, Tensor, Tensor, Tensor> run_backward(
    AttentionBackwardParams& p, const Tensor& dout, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, bool bias_grad) {
  const bool packed = is_packed(p.forward);
  check_heads(out, "out", q, packed);
  check_heads(dout, "dout", q, packed);
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && dout.sizes() == q.sizes(),
                    "out and dout must have q's shape");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.is_contiguous()
                        && lse.sizes() == at::IntArrayRef(lse_shape(p.forward)),
                    packed ? "lse must be a contiguous float32 [heads_q, total_q] tensor"
                           : "lse must be a contiguous float32 [batch, heads_q, seq_q] tensor");
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse must be on ", q.device());
  p.forward.out = const_cast<void*>(out.data_ptr());
  copy_strides(out, p.forward.out_strides, packed);
  p.forward.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr();
  copy_strides(dout, p.dout_strides, packed);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  const AttentionParams& f = p.forward;
  Tensor dbias = bias_grad ? at::empty({f.batch, f.heads_q, f.seq_q, f.seq_kv},
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

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const OptTensor& mask, bool causal, double scale, int64_t window,
    double softcap, double dropout_p, int64_t seed, bool bias_grad) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attention_backward of transfuse._C runs on CPU tensors");
  AttentionBackwardParams p;
  p.forward = forward_params(q, k, v, mask, causal, scale, window, softcap, dropout_p, seed);
  return run_backward(p, dout, q, k, v, out, lse, bias_grad);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> varlen_attention_backward(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const OptTensor& mask, bool causal, double scale,
    int64_t window, double softcap, double dropout_p, int64_t seed, bool bias_grad) {
  TORCH_CHECK_VALUE(q.device().is_cpu(),
                    "varlen_attention_backward of transfuse._C runs on CPU tensors");
  const Packing packing{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  AttentionBackwardParams p;
  p.forward = forward_params(q, k, v, mask, causal, scale, window, softcap, dropout_p, seed,
                             &packing);
  return run_backward(p, dout, q, k, v, out, lse, bias_grad);
}

}  // namespace

// The kernels as functions of transfuse._C (python_functions.h).
void add_attention_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  const py::call_guard<py::gil_scoped_release> release_gil;
  // FlashAttention's varlen layout: q [total_q, Hq, D], k / v [total_kv, Hkv, D], int32 offsets
  // cu_seqlens [batch + 1]; out [total_q, Hq, D], lse [Hq, total_q]; mask [batch, Hq, max_seqlen_q,
  // max_seqlen_k] in positions local to each sequence.
  m.def("attention_forward", &attention_forward, "q"_a, "k"_a, "v"_a, "mask"_a, "causal"_a,
        "scale"_a, "window"_a, "softcap"_a, "dropout_p"_a, "seed"_a, release_gil);
  m.def("attention_backward", &attention_backward, "dout"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a,
        "mask"_a, "causal"_a, "scale"_a, "window"_a, "softcap"_a, "dropout_p"_a, "seed"_a,
        "bias_grad"_a, release_gil);
  m.def("varlen_attention_forward", &varlen_attention_forward, "q"_a, "k"_a, "v"_a,
        "cu_seqlens_q"_a, "cu_seqlens_k"_a, "max_seqlen_q"_a, "max_seqlen_k"_a, "mask"_a,
        "causal"_a, "scale"_a, "window"_a, "softcap"_a, "dropout_p"_a, "seed"_a, release_gil);
  m.def("varlen_attention_backward", &varlen_attention_backward, "dout"_a, "q"_a, "k"_a, "v"_a,
        "out"_a, "lse"_a, "cu_seqlens_q"_a, "cu_seqlens_k"_a, "max_seqlen_q"_a, "max_seqlen_k"_a,
        "mask"_a, "causal"_a, "scale"_a, "window"_a, "softcap"_a, "dropout_p"_a, "seed"_a,
        "bias_grad"_a, release_gil);
}

}  // namespace transfuse
