// Binding of a Llama-style decoder layer in two calls around its KV cache's update (which stays
// the cache object's, in Python): transfuse._C.decoder_layer_qkv and decoder_layer_out. They run
// what the block rules run module by module on CPU tensors (python/transfuse/hf/blocks.py,
// "residual_rms_norm", "rotary_attention", "gated_mlp"), through the same tensor functions
// (tensor_functions.h), so the result is theirs bit for bit without some twenty Python calls per
// layer (a decoding step of a 30-layer model makes about 600). With x [B, S, hidden] and W_0..W_6
// the query, key, value, output, gate, up and down layers:
//   decoder_layer_qkv:  h = RMSNorm_0(x)
//                       q, k, v = h W_0^T (+ b_0), h W_1^T (+ b_1), h W_2^T (+ b_2),
//                                 as [B, heads, S, head_dim]
//                       q, k = RMSNorm_q(q), RMSNorm_k(k) over head_dim (Qwen3's head norms,
//                              where head_norm_weights holds their weights)
//                       q, k rotated by cos and sin (where given: SmolLM3's NoPE layers
//                              take none)
//   (the cache appends k and v: K, V)
//   decoder_layer_out:  a = softmax(scale q K^T + mask) V (causal, window, softcap as given;
//                           packed tokens, B = 1 with cu_seqlens: per sequence, no mask)
//                       g, r = RMSNorm_1(a W_3^T + x), a W_3^T + x
//                       y = r + (act(g W_4^T) * g W_5^T) W_6^T  (act: SiLU, or Gemma's tanh
//                           GELU, as mlp_activation names it)
//                       Gemma 2 / 3's sandwich norms (sandwich_norm_weights: RMSNorm_a, _m, with
//                       RMSNorm_1's offset, eps and dtypes), RMSNorm_1 their pre-MLP norm:
//                       g, r = RMSNorm_1(RMSNorm_a(a W_3^T) + x), RMSNorm_a(a W_3^T) + x
//                       y = r + RMSNorm_m((act(g W_4^T) * g W_5^T) W_6^T)
//                       Granite's residual_multiplier m scales each branch before its add:
//                       g, r = RMSNorm_1(m (a W_3^T) + x), m (a W_3^T) + x
//                       y = r + m ((act(g W_4^T) * g W_5^T) W_6^T)
// Float weights go through `linear` (torch's linear where torch_linears says so, or where
// `linear` declines the call, as transfuse.ops.linear does), int8 weights through `int8_linear`.
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ops/add.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/utils/pybind.h>

#include "python_functions.h"
#include "tensor_functions.h"

namespace transfuse {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The linear layers of one call and how they run: float (torch_linears) or int8 (weight_scales).
struct Linears {
  const std::vector<Tensor>& weights;
  const std::vector<Tensor>& weight_scales;
  const std::vector<OptTensor>& biases;
  const std::vector<bool>& torch_linears;
  c10::string_view int8_mode;

  void check(size_t count, const char* names) const {
    const bool int8 = !int8_mode.empty();
    TORCH_CHECK_VALUE(weights.size() == count && biases.size() == count, "weights and biases "
                      "must hold the ", count, " layers' (", names, ")");
    TORCH_CHECK_VALUE(torch_linears.size() == (int8 ? 0 : count), "torch_linears must say for "
                      "each float layer whether torch's linear runs it, or nothing for int8");
    TORCH_CHECK_VALUE(weight_scales.size() == (int8 ? count : 0), "weight_scales must hold the "
                      "int8 layers' scales, or nothing for float weights (int8_mode '')");
  }

  // in W_i^T + b_i
  Tensor operator()(size_t i, const Tensor& in) const {
    if (!int8_mode.empty()) {
      const OptTensor out = int8_linear(in, weights[i], weight_scales[i], biases[i], int8_mode);
      TORCH_CHECK_VALUE(out, "an int8 layer of the decoder layer has an empty product");
      return *out;
    }
    if (!torch_linears[i]) {
      if (OptTensor out = linear(in, weights[i], biases[i], "none")) return *out;
    }
    return at::linear(in, weights[i], biases[i]);
  }
};

Tensor rms_norm(const Tensor& x, const Tensor& weight, const OptTensor& residual, double offset,
                double eps, at::ScalarType normalized_dtype, at::ScalarType out_dtype,
                Tensor* sum = nullptr) {
  auto [y, x_plus_residual, mean, rstd] = norm_forward(x, weight, std::nullopt, residual, eps,
                                                       offset, true, normalized_dtype, out_dtype,
                                                       false);
  if (sum) *sum = x_plus_residual;
  return y;
}

std::tuple<Tensor, Tensor, Tensor> decoder_layer_qkv(
    const Tensor& x, const Tensor& norm_weight, double norm_offset, double eps,
    at::ScalarType normalized_dtype, at::ScalarType out_dtype, int64_t head_dim,
    const std::vector<Tensor>& weights, const std::vector<Tensor>& weight_scales,
    const std::vector<OptTensor>& biases, const std::vector<bool>& torch_linears,
    c10::string_view int8_mode, const std::vector<Tensor>& head_norm_weights,
    double head_norm_offset, double head_norm_eps, const OptTensor& cos, const OptTensor& sin) {
  const Linears linears{weights, weight_scales, biases, torch_linears, int8_mode};
  linears.check(3, "query, key, value");
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [batch, seq, hidden]");
  TORCH_CHECK_VALUE(head_dim > 0, "head_dim must be positive");
  TORCH_CHECK_VALUE(head_norm_weights.empty() || head_norm_weights.size() == 2,
                    "head_norm_weights must hold the query's and the key's head norm, or none");
  TORCH_CHECK_VALUE(!cos == !sin, "cos and sin go together (both given, or neither)");
  const Tensor h = rms_norm(x, norm_weight, std::nullopt, norm_offset, eps, normalized_dtype,
                            out_dtype);
  // [B, S, heads * head_dim] -> [B, heads, S, head_dim], through head norm i where there is one
  auto by_heads = [&](const Tensor& t, size_t i) {
    Tensor heads = t.view({x.size(0), x.size(1), -1, head_dim});
    if (i < head_norm_weights.size()) {
      heads = rms_norm(heads, head_norm_weights[i], std::nullopt, head_norm_offset,
                       head_norm_eps, normalized_dtype, out_dtype);
    }
    return heads.transpose(1, 2);
  };
  const Tensor q = by_heads(linears(0, h), 0), k = by_heads(linears(1, h), 1);
  const Tensor v = by_heads(linears(2, h), 2);
  if (!cos) {
    return {q, k, v};
  }
  auto [q_rotated, k_rotated] = rotary(q, k, *cos, *sin, false);
  return {q_rotated, k_rotated, v};
}

Tensor decoder_layer_out(const Tensor& x, const Tensor& q, const Tensor& k, const Tensor& v,
                         const OptTensor& mask, const OptTensor& cu_seqlens_q,
                         const OptTensor& cu_seqlens_k, int64_t max_seqlen_q,
                         int64_t max_seqlen_k, bool causal, double scale, int64_t window,
                         double softcap, const std::vector<Tensor>& weights,
                         const std::vector<Tensor>& weight_scales,
                         const std::vector<OptTensor>& biases,
                         const std::vector<bool>& torch_linears, c10::string_view int8_mode,
                         const Tensor& norm_weight, double norm_offset, double eps,
                         at::ScalarType normalized_dtype, at::ScalarType out_dtype,
                         c10::string_view mlp_activation,
                         const std::vector<Tensor>& sandwich_norm_weights,
                         std::optional<double> residual_multiplier) {
  const Linears linears{weights, weight_scales, biases, torch_linears, int8_mode};
  linears.check(4, "attention output, gate, up, down");
  const GatedActivation activation = to_gated_activation(mlp_activation);
  TORCH_CHECK_VALUE(sandwich_norm_weights.empty() || sandwich_norm_weights.size() == 2,
                    "sandwich_norm_weights must hold the norms after the attention and after "
                    "the MLP, or none");
  // RMSNorm_i of t (Gemma 2 / 3's norms after the attention and the MLP), t itself without them
  auto sandwich = [&](const Tensor& t, size_t i) {
    return sandwich_norm_weights.empty()
               ? t
               : rms_norm(t, sandwich_norm_weights[i], std::nullopt, norm_offset, eps,
                          normalized_dtype, out_dtype);
  };
  // a branch as its residual add takes it: times the multiplier where there is one (the
  // modules' `branch * multiplier`, rounded as theirs)
  auto scaled = [&](const Tensor& branch) {
    return residual_multiplier ? at::mul(branch, *residual_multiplier) : branch;
  };
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [batch, seq, hidden]");
  TORCH_CHECK_VALUE(!cu_seqlens_q == !cu_seqlens_k && (!cu_seqlens_q || x.size(0) == 1),
                    "cu_seqlens_q and cu_seqlens_k go together, with x [1, tokens, hidden]");
  Tensor rows;
  if (cu_seqlens_q) {  // [1, heads, T, D] as [T, heads, D] views in, [T, heads, D] out
    auto by_tokens = [](const Tensor& t) { return t.select(0, 0).transpose(0, 1); };
    rows = std::get<0>(varlen_attention_forward(by_tokens(q), by_tokens(k), by_tokens(v),
                                                *cu_seqlens_q, *cu_seqlens_k, max_seqlen_q,
                                                max_seqlen_k, std::nullopt, causal, scale,
                                                window, softcap, 0.0, 0))
               .reshape({1, x.size(1), -1})
               .contiguous();
  } else {  // [B, heads, S, D] whose storage is [B, S, heads, D]: the module's transpose
    rows = std::get<0>(attention_forward(q, k, v, mask, causal, scale, window, softcap, 0.0, 0))
               .transpose(1, 2)
               .contiguous()
               .view({x.size(0), x.size(1), -1});
  }
  Tensor residual;
  const Tensor g = rms_norm(scaled(sandwich(linears(0, rows), 0)), norm_weight, x, norm_offset,
                            eps, normalized_dtype, out_dtype, &residual);
  const Tensor gated = gated_mul_forward(linears(1, g), linears(2, g), activation);
  return at::add(residual, scaled(sandwich(linears(3, gated), 1)));
}

}  // namespace

void add_decoder_layer_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  const py::call_guard<py::gil_scoped_release> release_gil;
  m.def("decoder_layer_qkv", &decoder_layer_qkv, "x"_a, "norm_weight"_a, "norm_offset"_a,
        "eps"_a, "normalized_dtype"_a, "out_dtype"_a, "head_dim"_a, "weights"_a,
        "weight_scales"_a, "biases"_a, "torch_linears"_a, "int8_mode"_a, "head_norm_weights"_a,
        "head_norm_offset"_a, "head_norm_eps"_a, "cos"_a, "sin"_a, release_gil);
  m.def("decoder_layer_out", &decoder_layer_out, "x"_a, "q"_a, "k"_a, "v"_a, "mask"_a,
        "cu_seqlens_q"_a, "cu_seqlens_k"_a, "max_seqlen_q"_a, "max_seqlen_k"_a, "causal"_a,
        "scale"_a, "window"_a, "softcap"_a, "weights"_a, "weight_scales"_a, "biases"_a,
        "torch_linears"_a, "int8_mode"_a, "norm_weight"_a, "norm_offset"_a, "eps"_a,
        "normalized_dtype"_a, "out_dtype"_a, "mlp_activation"_a, "sandwich_norm_weights"_a,
        "residual_multiplier"_a, release_gil);
}

}  // namespace transfuse
