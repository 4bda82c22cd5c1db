// Binding of the rotary position embedding kernels: tensor checks, allocation, and the function
// transfuse._C.rotary (CPU or CUDA, from the tensors' device). The Python op transfuse::rotary
// (python/transfuse/ops/rotary.py) validates user input first; these checks guard the kernels
// against anything that slips past it.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <tuple>

#include "dtype.h"
#include "python_functions.h"
#include "tensor_functions.h"

#include "../common/rotary.h"
#include "../cpu/rotary.h"

#ifdef TRANSFUSE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../cuda/rotary.h"
#endif

namespace transfuse {
namespace {

using at::Tensor;

// [batch, heads, seq, head_dim] with a contiguous last dimension, q's dtype and device
void check_heads(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 4 && t.stride(3) == 1, name,
                    " must be a 4-D tensor with a contiguous last dimension");
  TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(2) == q.size(2) && t.size(3) == q.size(3),
                    name, " must have q's batch, sequence and head sizes");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype");
}

// [1 or batch, seq, head_dim] with a contiguous last dimension
void check_angles(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.stride(2) == 1 && (t.size(0) == 1 || t.size(0) == q.size(0))
                        && t.size(1) == q.size(2) && t.size(2) == q.size(3),
                    name, " must have shape [1 or batch, seq, head_dim] with a contiguous last "
                    "dimension");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on ", q.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype");
}

}  // namespace

std::tuple<Tensor, Tensor> rotary(const Tensor& q, const Tensor& k, const Tensor& cos,
                                  const Tensor& sin, bool inverse) {
  check_heads(q, "q", q);
  check_heads(k, "k", q);
  check_angles(cos, "cos", q);
  check_angles(sin, "sin", q);
  TORCH_CHECK_VALUE(q.size(3) % 2 == 0, "head_dim must be even, got ", q.size(3));
  RotaryParams p;
  p.dtype = to_dtype(q.scalar_type(), "q");
  Tensor q_out = at::empty(q.sizes(), q.options());
  Tensor k_out = at::empty(k.sizes(), k.options());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = q.stride(i);
    p.k_strides[i] = k.stride(i);
  }
  for (int i = 0; i < 2; ++i) {
    p.cos_strides[i] = cos.size(0) == 1 && i == 0 ? 0 : cos.stride(i);
    p.sin_strides[i] = sin.size(0) == 1 && i == 0 ? 0 : sin.stride(i);
  }
  p.batch = q.size(0);
  p.q_heads = q.size(1);
  p.k_heads = k.size(1);
  p.seq = q.size(2);
  p.head_dim = q.size(3);
  p.inverse = inverse;
  if (q.is_cuda()) {
#ifdef TRANSFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    cuda::rotary_launch(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  } else {
    TORCH_CHECK_VALUE(p.head_dim <= cpu::kRotaryMaxHeadDim, "head_dim must be at most ",
                      cpu::kRotaryMaxHeadDim, " on the CPU, got ", p.head_dim);
    p.num_threads = at::get_num_threads();
    cpu::rotary(p);
  }
  return {q_out, k_out};
}

// The kernel as a function of transfuse._C (python_functions.h).
void add_rotary_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  m.def("rotary", &rotary, "q"_a, "k"_a, "cos"_a, "sin"_a, "inverse"_a,
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace transfuse
