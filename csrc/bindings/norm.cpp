// Binding of the fused norm kernels: tensor checks, allocation, registration as torch ops
// transfuse_C::norm_forward / norm_backward for the CPU and CUDA dispatch keys.
// The Python op transfuse::norm (python/transfuse/ops/norm.py) validates user input first;
// these checks guard the kernels against anything that slips past it.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "dtype.h"

#include "../cpu/norm.h"

#ifdef TRANSFUSE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/norm.h"
#endif

namespace transfuse {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_matrix(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device());
}

void check_vector(const OptTensor& t, const char* name, const Tensor& like) {
  if (!t) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->is_contiguous() && t->size(0) == like.size(1), name,
                    " must be a contiguous vector of ", like.size(1), " elements");
  TORCH_CHECK_VALUE(t->device() == like.device(), name, " must be on ", like.device());
  to_dtype(t->scalar_type(), name);
}

void check_stats(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == like.size(0)
                        && t.device() == like.device(),
                    name, " must be a float32 vector of ", like.size(0), " elements");
}

const void* data_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, double weight_offset, bool rms, at::ScalarType normalized_dtype,
    at::ScalarType out_dtype) {
  check_matrix(x, "x", x);
  NormForwardParams p;
  p.x_dtype = to_dtype(x.scalar_type(), "x");
  check_vector(weight, "weight", x);
  check_vector(bias, "bias", x);
  TORCH_CHECK_VALUE(!(rms && bias), "bias is not supported by RMSNorm");
  TORCH_CHECK_VALUE(!bias || !weight || bias->scalar_type() == weight->scalar_type(),
                    "bias must have the dtype of weight");
  if (residual) {
    check_matrix(*residual, "residual", x);
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "residual must have x's dtype");
  }
  const int64_t rows = x.size(0);
  Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  Tensor residual_out = residual ? at::empty_like(x) : at::empty({0}, x.options());
  auto stats_options = x.options().dtype(at::kFloat);
  Tensor mean = at::empty({rms ? 0 : rows}, stats_options);
  Tensor rstd = at::empty({rows}, stats_options);

  p.x = x.data_ptr();
  p.residual = data_or_null(residual);
  p.weight = data_or_null(weight);
  p.bias = data_or_null(bias);
  p.y = y.data_ptr();
  p.residual_out = residual ? residual_out.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.cols = x.size(1);
  p.eps = static_cast<float>(eps);
  p.weight_offset = static_cast<float>(weight_offset);
  p.rms = rms;
  p.weight_dtype = weight ? to_dtype(weight->scalar_type(), "weight")
                          : (bias ? to_dtype(bias->scalar_type(), "bias") : p.x_dtype);
  p.normalized_dtype = to_dtype(normalized_dtype, "normalized_dtype");
  p.out_dtype = to_dtype(out_dtype, "out_dtype");
  if (x.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::norm_forward_launch(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    p.num_threads = at::get_num_threads();
    cpu::norm_forward(p);
  }
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_backward(
    const Tensor& dy, const OptTensor& dresidual_out, const Tensor& h, const OptTensor& weight,
    const Tensor& mean, const Tensor& rstd, double weight_offset, bool rms, bool has_bias) {
  check_matrix(h, "h", h);
  check_matrix(dy, "dy", h);
  if (dresidual_out) {
    check_matrix(*dresidual_out, "dresidual_out", h);
    TORCH_CHECK_TYPE(dresidual_out->scalar_type() == h.scalar_type(),
                     "dresidual_out must have h's dtype");
  }
  check_vector(weight, "weight", h);
  check_stats(rstd, "rstd", h);
  if (!rms) check_stats(mean, "mean", h);
  NormBackwardParams p;
  p.x_dtype = to_dtype(h.scalar_type(), "h");
  p.out_dtype = to_dtype(dy.scalar_type(), "dy");
  p.weight_dtype = weight ? to_dtype(weight->scalar_type(), "weight") : p.x_dtype;
  Tensor dx = at::empty_like(h);
  auto param_options = weight ? weight->options() : h.options();
  Tensor dweight = at::empty({weight ? h.size(1) : 0}, param_options);
  Tensor dbias = at::empty({has_bias ? h.size(1) : 0}, param_options);

  p.dy = dy.data_ptr();
  p.dresidual_out = data_or_null(dresidual_out);
  p.h = h.data_ptr();
  p.weight = data_or_null(weight);
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dweight = weight ? dweight.data_ptr() : nullptr;
  p.dbias = has_bias ? dbias.data_ptr() : nullptr;
  p.rows = h.size(0);
  p.cols = h.size(1);
  p.weight_offset = static_cast<float>(weight_offset);
  p.rms = rms;
  auto workspace_options = h.options().dtype(at::kFloat);
  if (h.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(h.device());
    Tensor workspace = at::empty({cuda::norm_backward_workspace_floats(p)}, workspace_options);
    cuda::norm_backward_launch(p, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    p.num_threads = at::get_num_threads();
    Tensor workspace = at::empty({cpu::norm_backward_workspace_floats(p)}, workspace_options);
    cpu::norm_backward(p, workspace.data_ptr<float>());
  }
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(transfuse_C, m) {
  m.def("norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
        "float weight_offset, bool rms, ScalarType normalized_dtype, ScalarType out_dtype) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_backward(Tensor dy, Tensor? dresidual_out, Tensor h, Tensor? weight, Tensor mean, "
        "Tensor rstd, float weight_offset, bool rms, bool has_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(transfuse_C, CPU, m) {
  m.impl("norm_forward", &norm_forward);
  m.impl("norm_backward", &norm_backward);
}

#ifdef TRANSFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(transfuse_C, CUDA, m) {
  m.impl("norm_forward", &norm_forward);
  m.impl("norm_backward", &norm_backward);
}
#endif

}  // namespace transfuse
