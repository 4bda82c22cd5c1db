// Binding of the fp32 linear: transfuse._C.linear(x, w, bias) = x @ w^T + bias. On the CPU with
// AVX-512, fp32 x and w: cpu::gemm (weights packed per call into L2-resident panels); any other
// call is torch's own (at::linear), which the binding says by returning None.
// python/transfuse/ops/linear.py validates user input first; these checks guard the kernel.
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "python_functions.h"

#include "../cpu/gemm.h"

namespace transfuse {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// x [..., k] (any layout) @ w [n, k]^T + bias [n] -> [..., n]; None where cpu::gemm does not take
// the call (not CPU fp32, no AVX-512, an empty product).
std::optional<Tensor> linear(const Tensor& x, const Tensor& w, const OptTensor& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension");
  TORCH_CHECK_VALUE(w.dim() == 2, "weight must be 2-D [out_features, in_features]");
  const int64_t k = x.size(-1), n = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == k, "x's last dimension (", k,
                    ") must equal weight's in_features (", w.size(1), ")");
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == n),
                    "bias must be a vector of out_features = ", n, " elements");
  const bool fp32 = x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                    (!bias || bias->scalar_type() == at::kFloat);
  const bool cpu = x.device().is_cpu() && w.device().is_cpu() && (!bias || bias->device().is_cpu());
  const int64_t m = x.numel() / std::max<int64_t>(k, 1);
  if (!fp32 || !cpu || m == 0 || n == 0 || k == 0) return std::nullopt;
  const Tensor x2 = x.reshape({m, k}).contiguous(), w_c = w.contiguous();
  const OptTensor bias_c = bias ? OptTensor(bias->contiguous()) : std::nullopt;
  Tensor out = at::empty({m, n}, x.options());
  GemmParams p;
  p.x = x2.data_ptr<float>();
  p.w = w_c.data_ptr<float>();
  p.bias = bias_c ? bias_c->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.m = m;
  p.n = n;
  p.k = k;
  p.num_threads = at::get_num_threads();
  if (!cpu::gemm(p)) return std::nullopt;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  return out.view(out_shape);
}

}  // namespace

void add_linear_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  m.def("linear", &linear, "x"_a, "w"_a, "bias"_a, py::call_guard<py::gil_scoped_release>());
}

}  // namespace transfuse
