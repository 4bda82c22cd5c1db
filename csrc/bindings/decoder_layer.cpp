// Binding of a Llama-style decoder layer in two calls around its KV cache's update (which stays
// the cache object's, in Python): transfuse._C.decoder_layer_qkv and decoder_layer_out. They run
// what the block rules run module by module on CPU tensors (python/transfuse/hf/blocks/,
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
//
// Binding of a BART-like (seq2seq) decoder layer's step in the same two calls:
// transfuse._C.seq2seq_decoder_layer_qkv and seq2seq_decoder_layer_out ("seq2seq_decoder_layer"
// in hf/blocks/: BART, Marian, PLBart, Blenderbot-small post-norm; mBART, M2M100 / NLLB, Pegasus,
// Blenderbot, Whisper pre-norm), the cross-attention reading the keys and values of the encoder's
// output that the cache holds. With LN_0, LN_1, LN_2 the self-attention, cross-attention and final
// LayerNorms and W_0..W_7 the query, key, value, attention output, cross-attention query and
// output, fc1 and fc2 layers (with their biases; Whisper's key has none):
//   seq2seq_decoder_layer_qkv:  h = LN_0(x) (pre-norm) or x (post-norm)
//                               q, k, v = h W_0^T + b_0, h W_1^T + b_1, h W_2^T + b_2,
//                                         as [B, heads, S, head_dim]
//                               (Whisper: q times query_scale, the attentions' scale then 1)
//   (the self-attention cache appends k and v: K, V)
//   seq2seq_decoder_layer_out:  a = softmax(scale q K^T + mask) V W_3^T + b_3
//                               cross(h) = softmax(scale q_c K_c^T + mask_c) V_c W_5^T + b_5,
//                                          q_c = h W_4^T + b_4 (Whisper: times query_scale)
//                               ffn(h) = act(h W_6^T + b_6) W_7^T + b_7
//     post-norm:  h_1 = LN_0(x + a), h_2 = LN_1(h_1 + cross(h_1)), y = LN_2(h_2 + ffn(h_2))
//     pre-norm:   h_1 = x + a,       h_2 = h_1 + cross(LN_1(h_1)),  y = h_2 + ffn(LN_2(h_2))
// Each residual add is its own torch add before the LayerNorm, as the modules compute it.
// Float weights go through `linear` (torch's linear where torch_linears says so, or where
// `linear` declines the call, as transfuse.ops.linear does), int8 weights through `int8_linear`.
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ops/add.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
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

// [B, S, heads * head_dim] -> [B, heads, S, head_dim] (a view, as the modules' transpose)
Tensor by_heads(const Tensor& t, int64_t head_dim) {
  return t.view({t.size(0), t.size(1), -1, head_dim}).transpose(1, 2);
}

// softmax(scale q k^T + mask) v over [B, heads, S, head_dim] views -> [B, S, heads * head_dim]
Tensor attended_rows(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
                     bool causal, double scale) {
  return std::get<0>(attention_forward(q, k, v, mask, causal, scale, 0, 0.0, 0.0, 0))
      .transpose(1, 2)
      .contiguous()
      .view({q.size(0), q.size(2), -1});
}

std::tuple<Tensor, Tensor, Tensor> seq2seq_decoder_layer_qkv(
    const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias, double eps,
    int64_t head_dim, const std::vector<Tensor>& weights, const std::vector<Tensor>& weight_scales,
    const std::vector<OptTensor>& biases, const std::vector<bool>& torch_linears,
    c10::string_view int8_mode, std::optional<double> query_scale) {
  const Linears linears{weights, weight_scales, biases, torch_linears, int8_mode};
  linears.check(3, "query, key, value");
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [batch, seq, hidden]");
  TORCH_CHECK_VALUE(head_dim > 0, "head_dim must be positive");
  TORCH_CHECK_VALUE(!norm_weight == !norm_bias, "norm_weight and norm_bias go together (the "
                    "pre-norm layer's self-attention LayerNorm), or neither (post-norm)");
  const Tensor h =
      norm_weight ? layer_norm_forward(x, *norm_weight, *norm_bias, std::nullopt, eps) : x;
  const Tensor q = linears(0, h);
  return {by_heads(query_scale ? at::mul(q, *query_scale) : q, head_dim),
          by_heads(linears(1, h), head_dim), by_heads(linears(2, h), head_dim)};
}

Tensor seq2seq_decoder_layer_out(
    const Tensor& x, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
    bool causal, double scale, const Tensor& cross_k, const Tensor& cross_v,
    const OptTensor& cross_mask, const std::vector<Tensor>& weights,
    const std::vector<Tensor>& weight_scales, const std::vector<OptTensor>& biases,
    const std::vector<bool>& torch_linears, c10::string_view int8_mode,
    const std::vector<Tensor>& norm_weights, const std::vector<Tensor>& norm_biases,
    const std::vector<double>& eps, c10::string_view activation, bool pre_norm,
    std::optional<double> query_scale) {
  const Linears linears{weights, weight_scales, biases, torch_linears, int8_mode};
  linears.check(5, "attention output, cross-attention query and output, fc1, fc2");
  TORCH_CHECK_VALUE(norm_weights.size() == 3 && norm_biases.size() == 3 && eps.size() == 3,
                    "norm_weights, norm_biases and eps must hold the three LayerNorms' "
                    "(self-attention, cross-attention, final)");
  TORCH_CHECK_VALUE(activation == "silu" || activation == "gelu" || activation == "gelu_tanh" ||
                        activation == "relu",
                    "activation must be 'silu', 'gelu', 'gelu_tanh' or 'relu', got '", activation,
                    "'");
  TORCH_CHECK_VALUE(x.dim() == 3 && q.dim() == 4, "x must be [batch, seq, hidden] and q "
                    "[batch, heads, seq, head_dim]");
  auto layer_norm = [&](size_t i, const Tensor& t) {
    return layer_norm_forward(t, norm_weights[i], norm_biases[i], std::nullopt, eps[i]);
  };
  auto act = [&](const Tensor& t) {
    if (activation == "silu") return at::silu(t);
    if (activation == "relu") return at::relu(t);
    return at::gelu(t, activation == "gelu" ? "none" : "tanh");
  };
  auto cross = [&](const Tensor& h) {
    const Tensor cross_q = linears(1, h);
    return linears(2, attended_rows(
                          by_heads(query_scale ? at::mul(cross_q, *query_scale) : cross_q,
                                   q.size(3)),
                          cross_k, cross_v, cross_mask, false, scale));
  };
  auto ffn = [&](const Tensor& h) { return linears(4, act(linears(3, h))); };
  const Tensor a = linears(0, attended_rows(q, k, v, mask, causal, scale));
  if (pre_norm) {
    const Tensor h1 = at::add(x, a);
    const Tensor h2 = at::add(h1, cross(layer_norm(1, h1)));
    return at::add(h2, ffn(layer_norm(2, h2)));
  }
  const Tensor h1 = layer_norm(0, at::add(x, a));
  const Tensor h2 = layer_norm(1, at::add(h1, cross(h1)));
  return layer_norm(2, at::add(h2, ffn(h2)));
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
  m.def("seq2seq_decoder_layer_qkv", &seq2seq_decoder_layer_qkv, "x"_a, "norm_weight"_a,
        "norm_bias"_a, "eps"_a, "head_dim"_a, "weights"_a, "weight_scales"_a, "biases"_a,
        "torch_linears"_a, "int8_mode"_a, "query_scale"_a, release_gil);
  m.def("seq2seq_decoder_layer_out", &seq2seq_decoder_layer_out, "x"_a, "q"_a, "k"_a, "v"_a,
        "mask"_a, "causal"_a, "scale"_a, "cross_k"_a, "cross_v"_a, "cross_mask"_a, "weights"_a,
        "weight_scales"_a, "biases"_a, "torch_linears"_a, "int8_mode"_a, "norm_weights"_a,
        "norm_biases"_a, "eps"_a, "activation"_a, "pre_norm"_a, "query_scale"_a, release_gil);
}

}  // namespace transfuse
