// Binding of the linear: transfuse._C.linear(x, w, bias, activation) = act(x @ w^T + bias), act
// "none", "gelu" or "gelu_tanh". On the CPU with AVX-512, fp32 or bf16: one row (decoding),
// cpu::gemv (weights as stored); from 2 rows the GEMMs (fp32: cpu::gemm; bf16 with AVX512_BF16:
// cpu::gemm_bf16) with the weights packed into L2-sized panels, kept between calls where
// packed_weights.h keeps them, else packed per call; up to cpu::kGemvMaxRows rows of a weight
// whose panels are never kept (an inference tensor: packing per call would cost more than the
// GEMV) or of bf16 without AVX512_BF16, cpu::gemv. With AVX2 and FMA but not AVX-512: the same
// up to cpu::gemm_max_rows() rows, bf16 on cpu::gemv alone. The kernel depends on the shapes, dtypes,
// the weight's kind and the CPU, not on the cache's state, so a call's bits do too. Any other
// call is left to torch (at::linear): the binding returns None.
// python/transfuse/ops/linear.py validates user input first; these checks guard the kernel.
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "dtype.h"
#include "packed_weights.h"
#include "python_functions.h"
#include "tensor_functions.h"

#include "../cpu/gemm.h"

namespace transfuse {
namespace {
using at::Tensor;
using OptTensor = std::optional<Tensor>;
}  // namespace

// x [..., k] (any layout) @ w [n, k]^T + bias [n] -> [..., n]; None where transfuse's GEMMs do not
// take the call (not on the CPU, dtypes other than all fp32 or all bf16, more rows than the GEMV
// or gemm_max_rows() take, bf16 without AVX512_BF16 beyond the GEMV, a CPU without AVX2 and FMA,
// an empty product).
std::optional<Tensor> linear(const Tensor& x, const Tensor& w, const OptTensor& bias,
                             c10::string_view activation) {
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu" || activation == "gelu_tanh",
                    "activation must be one of (None, 'gelu', 'gelu_tanh'), got '", activation,
                    "'");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension");
  TORCH_CHECK_VALUE(w.dim() == 2, "weight must be 2-D [out_features, in_features]");
  const int64_t k = x.size(-1), n = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == k, "x's last dimension (", k,
                    ") must equal weight's in_features (", w.size(1), ")");
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == n),
                    "bias must be a vector of out_features = ", n, " elements");
  const at::ScalarType dtype = x.scalar_type();
  const bool same_dtype = w.scalar_type() == dtype && (!bias || bias->scalar_type() == dtype);
  const bool cpu = x.device().is_cpu() && w.device().is_cpu() && (!bias || bias->device().is_cpu());
  const bool bf16 = dtype == at::kBFloat16;
  const int64_t m = x.numel() / std::max<int64_t>(k, 1);
  if (!same_dtype || !cpu || (dtype != at::kFloat && !bf16) || m == 0 || n == 0 || k == 0 ||
      !cpu::has_gemv())
    return std::nullopt;
  const bool gemv = m == 1 || (m <= cpu::kGemvMaxRows && !PackedWeights::may_keep(w)) ||
                    (bf16 && !cpu::has_gemm_bf16()) || m > cpu::gemm_max_rows();
  if (gemv && m > cpu::kGemvMaxRows) return std::nullopt;
  const Tensor x2 = x.reshape({m, k}).contiguous(), w_c = w.contiguous();
  const OptTensor bias_f = bias ? OptTensor(bias->to(at::kFloat).contiguous()) : std::nullopt;
  Tensor out = at::empty({m, n}, x.options());
  GemmParams p;
  p.x = x2.data_ptr();
  p.w = w_c.data_ptr();
  p.bias = bias_f ? bias_f->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.m = m;
  p.n = n;
  p.k = k;
  p.dtype = bf16 ? DType::bf16 : DType::f32;
  p.gelu = activation != "none";
  p.approximate = activation == "gelu_tanh" ? GeluApproximation::tanh : GeluApproximation::none;
  p.num_threads = at::get_num_threads();
  std::optional<Tensor> packed;
  if (!gemv && w.is_contiguous()) {  // (a copy of w would not outlive the call)
    packed = packed_weights().of(
        w, bf16 ? cpu::packed_weight_bytes_bf16(n, k) : cpu::packed_weight_bytes_fp32(n, k),
        [bf16](const Tensor& w, Tensor& out) {
          const int threads = at::get_num_threads();
          return bf16 ? cpu::pack_weight_bf16(static_cast<const uint16_t*>(w.data_ptr()),
                                              w.size(0), w.size(1), out.data_ptr(), threads)
                      : cpu::pack_weight_fp32(w.data_ptr<float>(), w.size(0), w.size(1),
                                              out.data_ptr(), threads);
        });
    if (packed) p.w_packed = packed->data_ptr();
  }
  if (!(gemv ? cpu::gemv(p) : bf16 ? cpu::gemm_bf16(p) : cpu::gemm(p))) return std::nullopt;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  return out.view(out_shape);
}

void add_linear_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  m.def("linear", &linear, "x"_a, "w"_a, "bias"_a, "activation"_a,
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace transfuse
