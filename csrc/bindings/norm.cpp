// Binding of the fused norm kernels: tensor checks, allocation, and the functions
// transfuse._C.norm_forward / norm_backward (CPU or CUDA, from the tensors' device).
// The checks here are the cpu and cuda backends' input validation (errors name the argument;
// python/transfuse/ops/norm.py re-checks only to word a failure as the other backends do).
#include <cmath>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include "dtype.h"
#include "python_functions.h"
#include "tensor_functions.h"

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

// x and the tensors shaped like it may have any layout: the kernels read a contiguous copy
// (x itself when it is contiguous) as [rows, cols], cols = the last dimension.
Tensor contiguous_rows(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) > 0, name,
                    " must have a non-empty last (hidden) dimension, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device());
  return t.contiguous();
}

OptTensor contiguous_vector(const OptTensor& t, const char* name, const Tensor& like) {
  if (!t) return t;
  const int64_t cols = like.size(-1);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == cols, name, " must have shape (", cols,
                    ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == like.device(), name, " is on ", t->device(), " but x is on ",
                    like.device());
  to_dtype(t->scalar_type(), name);
  return t->contiguous();
}

void check_stats(const Tensor& t, const char* name, int64_t rows, const Tensor& like) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == rows
                        && t.device() == like.device(),
                    name, " must be a float32 vector of ", rows, " elements");
}

const void* data_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

}  // namespace

// -> (y, x + residual or empty, mean [rows] or empty, rstd [rows] or empty); y and x + residual
// in x's shape, rows = x.numel() / cols; the statistics only when save_stats (for a backward),
// and without save_stats None for each empty one.
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_forward(
    const Tensor& x_in, const OptTensor& weight_in, const OptTensor& bias_in,
    const OptTensor& residual_in, double eps, double weight_offset, bool rms,
    at::ScalarType normalized_dtype, at::ScalarType out_dtype, bool save_stats) {
  const Tensor x = contiguous_rows(x_in, "x", x_in);
  NormForwardParams p;
  p.x_dtype = to_dtype(x.scalar_type(), "x");
  const OptTensor weight = contiguous_vector(weight_in, "weight", x);
  const OptTensor bias = contiguous_vector(bias_in, "bias", x);
  TORCH_CHECK_VALUE(!(rms && bias), "bias is not supported by RMSNorm");
  TORCH_CHECK_TYPE(!bias || !weight || bias->scalar_type() == weight->scalar_type(),
                   "bias must have the dtype of weight");
  OptTensor residual;
  if (residual_in) {
    residual = contiguous_rows(*residual_in, "residual", x);
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "residual must have x's dtype");
  }
  TORCH_CHECK_VALUE(eps >= 0 && eps < INFINITY, "eps must be finite and >= 0, got ", eps);
  const int64_t cols = x.size(-1);
  const int64_t rows = x.numel() / cols;
  Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  // What is not computed is an empty tensor for the custom op (whose schema returns tensors), but
  // None without save_stats (a call with no backward): an allocation is 0.2 us of a 3 us call.
  auto nothing = [&](const at::TensorOptions& options) {
    return save_stats ? at::empty({0}, options) : Tensor();
  };
  Tensor residual_out = residual ? at::empty_like(x) : nothing(x.options());
  auto stats_options = x.options().dtype(at::kFloat);
  Tensor mean = rms || !save_stats ? nothing(stats_options) : at::empty({rows}, stats_options);
  Tensor rstd = save_stats ? at::empty({rows}, stats_options) : nothing(stats_options);

  p.x = x.data_ptr();
  p.residual = data_or_null(residual);
  p.weight = data_or_null(weight);
  p.bias = data_or_null(bias);
  p.y = y.data_ptr();
  p.residual_out = residual ? residual_out.data_ptr() : nullptr;
  p.mean = rms || !save_stats ? nullptr : mean.data_ptr<float>();
  p.rstd = save_stats ? rstd.data_ptr<float>() : nullptr;
  p.rows = rows;
  p.cols = cols;
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

Tensor layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                          const std::optional<Tensor>& residual, double eps) {
  return std::get<0>(norm_forward(x, weight, bias, residual, eps, 0.0, false, at::kFloat,
                                  x.scalar_type(), false));
}

namespace {

// -> (dx [= dresidual] in h's shape, dweight or empty, dbias or empty)
std::tuple<Tensor, Tensor, Tensor> norm_backward(
    const Tensor& dy_in, const OptTensor& dresidual_out_in, const Tensor& h_in,
    const OptTensor& weight_in, const Tensor& mean, const Tensor& rstd, double weight_offset,
    bool rms, bool has_bias) {
  const Tensor h = contiguous_rows(h_in, "h", h_in);
  const Tensor dy = contiguous_rows(dy_in, "dy", h);
  OptTensor dresidual_out;
  if (dresidual_out_in) {
    dresidual_out = contiguous_rows(*dresidual_out_in, "dresidual_out", h);
    TORCH_CHECK_TYPE(dresidual_out->scalar_type() == h.scalar_type(),
                     "dresidual_out must have h's dtype");
  }
  const OptTensor weight = contiguous_vector(weight_in, "weight", h);
  const int64_t cols = h.size(-1);
  const int64_t rows = h.numel() / cols;
  check_stats(rstd, "rstd", rows, h);
  if (!rms) check_stats(mean, "mean", rows, h);
  NormBackwardParams p;
  p.x_dtype = to_dtype(h.scalar_type(), "h");
  p.out_dtype = to_dtype(dy.scalar_type(), "dy");
  p.weight_dtype = weight ? to_dtype(weight->scalar_type(), "weight") : p.x_dtype;
  Tensor dx = at::empty_like(h);
  auto param_options = weight ? weight->options() : h.options();
  Tensor dweight = at::empty({weight ? cols : 0}, param_options);
  Tensor dbias = at::empty({has_bias ? cols : 0}, param_options);

  p.dy = dy.data_ptr();
  p.dresidual_out = data_or_null(dresidual_out);
  p.h = h.data_ptr();
  p.weight = data_or_null(weight);
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dweight = weight ? dweight.data_ptr() : nullptr;
  p.dbias = has_bias ? dbias.data_ptr() : nullptr;
  p.rows = rows;
  p.cols = cols;
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

// The kernels as functions of transfuse._C (python_functions.h).
void add_norm_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  const py::call_guard<py::gil_scoped_release> release_gil;
  m.def("norm_forward", &norm_forward, "x"_a, "weight"_a, "bias"_a, "residual"_a, "eps"_a,
        "weight_offset"_a, "rms"_a, "normalized_dtype"_a, "out_dtype"_a,
        "save_stats"_a = true, release_gil);
  m.def("norm_backward", &norm_backward, "dy"_a, "dresidual_out"_a, "h"_a, "weight"_a, "mean"_a,
        "rstd"_a, "weight_offset"_a, "rms"_a, "has_bias"_a, release_gil);
}

}  // namespace transfuse
