// Binding of the activation kernels: tensor checks, allocation, and the functions
// transfuse._C.bias_gelu_forward / bias_gelu_backward and gated_mul_forward / gated_mul_backward
// (act(gate) * up; CPU or CUDA, from the tensors' device).
// The Python op transfuse::bias_gelu (python/transfuse/ops/activation.py) validates user input
// first; these checks guard the kernels against anything that slips past it. dbias (the sum of
// dx over rows) is left to the caller's torch sum.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <string_view>
#include <tuple>

#include "dtype.h"
#include "python_functions.h"
#include "tensor_functions.h"

#include "../common/activation.h"
#include "../cpu/activation.h"

#ifdef TRANSFUSE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/activation.h"
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
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have dtype ",
                   like.scalar_type(), ", got ", t.scalar_type());
}

void check_bias(const OptTensor& bias, const Tensor& x) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->is_contiguous() && bias->size(0) == x.size(1),
                    "bias must be a contiguous vector of ", x.size(1), " elements");
  TORCH_CHECK_VALUE(bias->device() == x.device(), "bias must be on ", x.device());
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ",
                   x.scalar_type(), ", got ", bias->scalar_type());
}

GeluApproximation to_approximation(std::string_view approximate) {
  if (approximate == "none") return GeluApproximation::none;
  TORCH_CHECK_VALUE(approximate == "tanh", "approximate must be 'none' or 'tanh', got '",
                    approximate, "'");
  return GeluApproximation::tanh;
}

}  // namespace

GatedActivation to_gated_activation(std::string_view activation) {
  if (activation == "silu") return GatedActivation::silu;
  if (activation == "gelu") return GatedActivation::gelu;
  TORCH_CHECK_VALUE(activation == "gelu_tanh",
                    "activation must be 'silu', 'gelu' or 'gelu_tanh', got '", activation, "'");
  return GatedActivation::gelu_tanh;
}

namespace {

const void* data_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

}  // namespace

Tensor bias_gelu_forward(const Tensor& x, const OptTensor& bias, c10::string_view approximate) {
  check_matrix(x, "x", x);
  check_bias(bias, x);
  BiasGeluForwardParams p;
  p.dtype = to_dtype(x.scalar_type(), "x");
  p.approximate = to_approximation(std::string_view(approximate.data(), approximate.size()));
  Tensor y = at::empty_like(x);
  p.x = x.data_ptr();
  p.bias = data_or_null(bias);
  p.y = y.data_ptr();
  p.rows = x.size(0);
  p.cols = x.size(1);
  if (x.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::bias_gelu_forward_launch(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    p.num_threads = at::get_num_threads();
    cpu::bias_gelu_forward(p);
  }
  return y;
}

namespace {

Tensor bias_gelu_backward(const Tensor& dy, const Tensor& x, const OptTensor& bias,
                          c10::string_view approximate) {
  check_matrix(x, "x", x);
  check_matrix(dy, "dy", x);
  check_bias(bias, x);
  BiasGeluBackwardParams p;
  p.dtype = to_dtype(x.scalar_type(), "x");
  p.approximate = to_approximation(std::string_view(approximate.data(), approximate.size()));
  Tensor dx = at::empty_like(x);
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.bias = data_or_null(bias);
  p.dx = dx.data_ptr();
  p.rows = x.size(0);
  p.cols = x.size(1);
  if (x.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    cuda::bias_gelu_backward_launch(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    p.num_threads = at::get_num_threads();
    cpu::bias_gelu_backward(p);
  }
  return dx;
}

// t [..., cols], of like's shape, dtype and device, as rows of cols contiguous elements lying
// evenly apart (the leading dimensions collapse into one): the distance between its rows.
int64_t row_stride(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have dtype ",
                   like.scalar_type(), ", got ", t.scalar_type());
  const int64_t dims = t.dim();
  TORCH_CHECK_VALUE(dims >= 1 && (t.stride(-1) == 1 || t.size(-1) <= 1), name,
                    " must have a contiguous last dimension");
  int64_t stride = -1, rows = 1;  // rows: of the inner leading dimensions walked so far
  for (int64_t i = dims - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (stride < 0) stride = t.stride(i);
    TORCH_CHECK_VALUE(t.stride(i) == stride * rows, name,
                      "'s rows must lie evenly apart (leading dimensions that collapse into one)");
    rows *= t.size(i);
  }
  return stride < 0 ? t.size(-1) : stride;
}

}  // namespace

// y = act(gate) * up over gate, up [..., cols] (row_stride), y contiguous of their shape
Tensor gated_mul_forward(const Tensor& gate, const Tensor& up, GatedActivation activation) {
  GatedMulForwardParams p;
  p.activation = activation;
  p.gate_row_stride = row_stride(gate, "gate", gate);
  p.up_row_stride = row_stride(up, "up", gate);
  p.dtype = to_dtype(gate.scalar_type(), "gate");
  Tensor y = at::empty(gate.sizes(), gate.options());
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.y = y.data_ptr();
  p.cols = gate.size(-1);  // (row_stride: at least one dimension)
  p.rows = p.cols ? gate.numel() / p.cols : 0;
  if (gate.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(gate.device());
    cuda::gated_mul_forward_launch(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    p.num_threads = at::get_num_threads();
    cpu::gated_mul_forward(p);
  }
  return y;
}

namespace {

Tensor gated_mul_forward_named(const Tensor& gate, const Tensor& up,
                               c10::string_view activation) {
  return gated_mul_forward(gate, up, to_gated_activation(activation));
}

std::tuple<Tensor, Tensor> gated_mul_backward(const Tensor& dy, const Tensor& gate,
                                              const Tensor& up, c10::string_view activation) {
  GatedMulBackwardParams p;
  p.activation = to_gated_activation(activation);
  p.gate_row_stride = row_stride(gate, "gate", gate);
  p.up_row_stride = row_stride(up, "up", gate);
  TORCH_CHECK_VALUE(dy.is_contiguous(), "dy must be contiguous");
  row_stride(dy, "dy", gate);
  p.dtype = to_dtype(gate.scalar_type(), "gate");
  Tensor dgate = at::empty(gate.sizes(), gate.options());
  Tensor dup = at::empty(gate.sizes(), gate.options());
  p.dy = dy.data_ptr();
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.dgate = dgate.data_ptr();
  p.dup = dup.data_ptr();
  p.cols = gate.size(-1);  // (row_stride: at least one dimension)
  p.rows = p.cols ? gate.numel() / p.cols : 0;
  if (gate.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(gate.device());
    cuda::gated_mul_backward_launch(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    p.num_threads = at::get_num_threads();
    cpu::gated_mul_backward(p);
  }
  return {dgate, dup};
}

}  // namespace

// The kernels as functions of transfuse._C (python_functions.h).
void add_activation_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  const py::call_guard<py::gil_scoped_release> release_gil;
  m.def("bias_gelu_forward", &bias_gelu_forward, "x"_a, "bias"_a, "approximate"_a, release_gil);
  m.def("bias_gelu_backward", &bias_gelu_backward, "dy"_a, "x"_a, "bias"_a, "approximate"_a,
        release_gil);
  m.def("gated_mul_forward", &gated_mul_forward_named, "gate"_a, "up"_a, "activation"_a,
        release_gil);
  m.def("gated_mul_backward", &gated_mul_backward, "dy"_a, "gate"_a, "up"_a, "activation"_a,
        release_gil);
}

}  // namespace transfuse
