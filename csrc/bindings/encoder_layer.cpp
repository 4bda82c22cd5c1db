// Binding of a BERT-style encoder layer in one call: transfuse._C.encoder_layer. It runs what the
// block rules run module by module on CPU tensors (python/transfuse/hf/blocks/,
// "encoder_layer"), through the same tensor functions (tensor_functions.h), so the result is
// theirs bit for bit, without some ten Python calls in between (on all-MiniLM-L6-v2's real
// sentences that Python was about a tenth of a batch's time). With x [1, T, hidden] packed tokens
// (cu_seqlens [B + 1]) or [B, S, hidden] with no padding, and W_0..W_5 the query, key, value,
// attention output, intermediate and output layers:
//   q, k, v = x W_0^T + b_0, x W_1^T + b_1, x W_2^T + b_2, as [tokens, heads, head_dim]
//   a = softmax(scale q k^T + bias) v per sequence (not causal; bias, when given, additive,
//       [heads, L, L] or [1, heads, L, L] read at positions local to each sequence: MPNet's
//       relative position bias, L the longest sequence; none: no mask)
//   h = LayerNorm_0(a W_3^T + b_3 + x)
//   y = LayerNorm_1(gelu(h W_4^T + b_4) W_5^T + b_5 + h)
// Float weights go through `linear` (bias and GELU in the GEMM's epilogue), or where
// torch_linears says so (the calls transfuse.ops.linear leaves to torch: too few rows for its
// GEMMs, a CPU where torch's run faster) through torch's linear and gelu; int8 weights through
// `int8_linear`, the GELU then through `bias_gelu` on the product without its bias, as the
// bias_gelu rule runs int8 layers; Q, K and V through `int8_linears` (w8a8: x quantized once, the
// same values as three calls). On CUDA tensors as the modules' rules run there (float weights):
// Q, K and V as one GEMM over their joined rows (the caller checked that the weights and biases
// are consecutive rows of one storage, as the projections rule keeps them), torch's linear for
// every GEMM, the intermediate layer's without its bias, then `bias_gelu`. Returns None where a
// kernel declines the call (before any output is returned, so the caller can run the modules
// instead).
#include <algorithm>
#include <optional>
#include <vector>

#include <ATen/ops/gelu.h>
#include <ATen/ops/linear.h>
#include <torch/csrc/utils/pybind.h>

#include "python_functions.h"
#include "tensor_functions.h"

namespace transfuse {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr size_t kLayers = 6;  // query, key, value, attention output, intermediate, output

// The tensors as one [sum of rows, ...] tensor where they are consecutive row blocks of one
// storage (contiguous, of one dtype and row shape), else nothing.
OptTensor joined_rows(const std::vector<Tensor>& tensors) {
  const Tensor& first = tensors.front();
  const int64_t row_size = first.numel() / std::max<int64_t>(first.size(0), 1);
  int64_t rows = 0;
  for (const Tensor& t : tensors) {
    if (!t.is_contiguous() || t.scalar_type() != first.scalar_type() ||
        t.sizes().slice(1) != first.sizes().slice(1) ||
        !t.storage().is_alias_of(first.storage()) ||
        t.storage_offset() != first.storage_offset() + rows * row_size)
      return std::nullopt;
    rows += t.size(0);
  }
  std::vector<int64_t> sizes = first.sizes().vec();
  sizes[0] = rows;
  return first.as_strided(sizes, first.strides(), first.storage_offset());
}

OptTensor encoder_layer(const Tensor& x, const OptTensor& cu_seqlens, int64_t max_seqlen,
                        int64_t heads, double scale, const std::vector<Tensor>& weights,
                        const std::vector<Tensor>& weight_scales,
                        const std::vector<Tensor>& biases, const std::vector<bool>& torch_linears,
                        c10::string_view int8_mode,
                        const std::vector<Tensor>& norm_weights,
                        const std::vector<Tensor>& norm_biases, const std::vector<double>& eps,
                        c10::string_view activation, const OptTensor& bias) {
  const bool int8 = !int8_mode.empty();
  TORCH_CHECK_VALUE(weights.size() == kLayers && biases.size() == kLayers,
                    "weights and biases must hold the 6 layers' (query, key, value, attention "
                    "output, intermediate, output)");
  TORCH_CHECK_VALUE(torch_linears.size() == (int8 ? 0 : kLayers),
                    "torch_linears must say for each of the 6 float layers whether torch's linear "
                    "runs it, or nothing for int8 weights");
  TORCH_CHECK_VALUE(weight_scales.size() == (int8 ? kLayers : 0),
                    "weight_scales must hold the 6 int8 layers' scales, or nothing for float "
                    "weights (int8_mode '')");
  TORCH_CHECK_VALUE(norm_weights.size() == 2 && norm_biases.size() == 2 && eps.size() == 2,
                    "norm_weights, norm_biases and eps must hold the two LayerNorms'");
  TORCH_CHECK_VALUE(activation == "gelu" || activation == "gelu_tanh",
                    "activation must be 'gelu' or 'gelu_tanh', got '", activation, "'");
  TORCH_CHECK_VALUE(x.dim() == 3 && (!cu_seqlens || x.size(0) == 1),
                    "x must be [1, tokens, hidden] with cu_seqlens, else [batch, seq, hidden]");
  const int64_t hidden = x.size(2);
  TORCH_CHECK_VALUE(heads > 0 && hidden % heads == 0, "heads (", heads,
                    ") must divide the hidden size (", hidden, ")");
  const int64_t head_dim = hidden / heads;
  const int64_t sequences = cu_seqlens ? cu_seqlens->numel() - 1 : x.size(0);
  const int64_t longest = cu_seqlens ? max_seqlen : x.size(1);
  TORCH_CHECK_VALUE(!bias || ((bias->dim() == 3 || (bias->dim() == 4 && bias->size(0) == 1)) &&
                              bias->size(-3) == heads && bias->size(-2) == longest &&
                              bias->size(-1) == longest),
                    "bias must be [heads, L, L] or [1, heads, L, L] with L = ", longest,
                    " (the longest sequence)");
  const OptTensor mask =
      bias ? OptTensor(bias->expand({sequences, heads, longest, longest})) : std::nullopt;

  const bool cuda = x.is_cuda();
  TORCH_CHECK_VALUE(!cuda || (!int8 && !bias), "on CUDA tensors the call takes float weights "
                    "and no attention bias");
  // in W_i^T + b_i (GELU of it for the intermediate layer); nothing where a kernel declines
  auto project = [&](size_t i, const Tensor& in) -> OptTensor {
    const bool gelu = i == 4;
    if (cuda && gelu) {
      const Tensor product = at::linear(in, weights[i]);
      return bias_gelu_forward(product.view({-1, product.size(-1)}), biases[i],
                               activation == "gelu" ? "none" : "tanh")
          .view(product.sizes());
    }
    if (!int8 && torch_linears[i]) {
      const Tensor product = at::linear(in, weights[i], biases[i]);
      return gelu ? at::gelu(product, activation == "gelu" ? "none" : "tanh") : product;
    }
    if (!int8) return linear(in, weights[i], biases[i], gelu ? activation : "none");
    if (!gelu) return int8_linear(in, weights[i], weight_scales[i], biases[i], int8_mode);
    const OptTensor product =
        int8_linear(in, weights[i], weight_scales[i], std::nullopt, int8_mode);
    if (!product) return std::nullopt;
    return bias_gelu_forward(product->view({-1, product->size(-1)}), biases[i].contiguous(),
                             activation == "gelu" ? "none" : "tanh")
        .view(product->sizes());
  };
  auto layer_norm = [&](size_t j, const Tensor& in, const Tensor& residual) {
    return layer_norm_forward(in, norm_weights[j], norm_biases[j], residual, eps[j]);
  };

  OptTensor q, k, v;
  if (cuda) {
    const OptTensor w_qkv = joined_rows({weights[0], weights[1], weights[2]});
    const OptTensor b_qkv = joined_rows({biases[0], biases[1], biases[2]});
    if (!w_qkv || !b_qkv) return std::nullopt;
    const Tensor qkv = at::linear(x, *w_qkv, *b_qkv);
    const int64_t n_q = weights[0].size(0), n_k = weights[1].size(0);
    q = qkv.narrow(-1, 0, n_q), k = qkv.narrow(-1, n_q, n_k);
    v = qkv.narrow(-1, n_q + n_k, weights[2].size(0));
  } else if (int8) {  // x quantized once for the three (w8a8)
    const auto qkv = int8_linears(x, {weights[0], weights[1], weights[2]},
                                  {weight_scales[0], weight_scales[1], weight_scales[2]},
                                  {biases[0], biases[1], biases[2]}, int8_mode);
    q = qkv[0], k = qkv[1], v = qkv[2];
  } else {
    q = project(0, x), k = project(1, x), v = project(2, x);
  }
  if (!q || !k || !v) return std::nullopt;
  Tensor attended;
  if (cu_seqlens) {
    auto by_heads = [&](const Tensor& t) { return t.view({x.size(1), heads, head_dim}); };
    attended = std::get<0>(varlen_attention_forward(
        by_heads(*q), by_heads(*k), by_heads(*v), *cu_seqlens, *cu_seqlens, max_seqlen,
        max_seqlen, mask, false, scale, 0, 0.0, 0.0, 0));
  } else {  // [B, heads, S, D] views in, the [B, S, heads, D] storage out
    auto by_heads = [&](const Tensor& t) {
      return t.view({x.size(0), x.size(1), heads, head_dim}).transpose(1, 2);
    };
    attended = std::get<0>(attention_forward(by_heads(*q), by_heads(*k), by_heads(*v), mask,
                                             false, scale, 0, 0.0, 0.0, 0))
                   .transpose(1, 2);
  }
  const OptTensor attention_out = project(3, attended.reshape(x.sizes()).contiguous());
  if (!attention_out) return std::nullopt;
  const Tensor h = layer_norm(0, *attention_out, x);
  const OptTensor intermediate = project(4, h);
  if (!intermediate) return std::nullopt;
  const OptTensor out = project(5, *intermediate);
  if (!out) return std::nullopt;
  return layer_norm(1, *out, h);
}

}  // namespace

void add_encoder_layer_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  m.def("encoder_layer", &encoder_layer, "x"_a, "cu_seqlens"_a, "max_seqlen"_a, "heads"_a,
        "scale"_a, "weights"_a, "weight_scales"_a, "biases"_a, "torch_linears"_a, "int8_mode"_a,
        "norm_weights"_a,
        "norm_biases"_a, "eps"_a, "activation"_a, "bias"_a = py::none(),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace transfuse
