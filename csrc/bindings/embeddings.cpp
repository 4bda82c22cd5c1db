// Binding of a BERT-style embedding block in one call: transfuse._C.embeddings_forward. It runs
// what BertEmbeddings runs module by module on given token ids, token types and positions
// (python/transfuse/hf/blocks/embeddings.py, "embeddings"), with the same operations in the
// same order, so the result is the module's bit for bit, without its half dozen Python module
// calls:
//   e = (word[input_ids] + token_type[token_type_ids]) + position[position_ids]
//   y = LayerNorm(e) (layer_norm_forward, as the norm rules' FusedLayerNorm runs it)
// Ids of any integer dtype; position_ids broadcast over the batch as the module's add does.
#include <optional>

#include <ATen/ops/embedding.h>
#include <torch/csrc/utils/pybind.h>

#include "python_functions.h"
#include "tensor_functions.h"

namespace transfuse {
namespace {

using at::Tensor;

void check_table(const Tensor& table, const char* name, const Tensor& word) {
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == word.size(1), name,
                    " must be a 2-D table as wide as word (", word.size(1), ")");
  TORCH_CHECK_TYPE(table.scalar_type() == word.scalar_type(), name, " must be ",
                   word.scalar_type(), " as word is, got ", table.scalar_type());
}

void check_ids(const Tensor& ids, const char* name) {
  TORCH_CHECK_TYPE(!at::isFloatingType(ids.scalar_type()) && !at::isComplexType(ids.scalar_type())
                       && ids.scalar_type() != at::kBool,
                   name, " must be an integer tensor, got ", ids.scalar_type());
}

Tensor embeddings_forward(const Tensor& input_ids, const Tensor& token_type_ids,
                          const Tensor& position_ids, const Tensor& word,
                          const Tensor& token_type, const Tensor& position,
                          const Tensor& norm_weight, const Tensor& norm_bias, double eps) {
  check_ids(input_ids, "input_ids");
  check_ids(token_type_ids, "token_type_ids");
  check_ids(position_ids, "position_ids");
  TORCH_CHECK_VALUE(word.dim() == 2, "word must be a 2-D table [vocabulary, width]");
  check_table(token_type, "token_type", word);
  check_table(position, "position", word);
  Tensor sum = at::embedding(word, input_ids);
  sum.add_(at::embedding(token_type, token_type_ids));
  sum.add_(at::embedding(position, position_ids));  // (any broadcast that sum's shape takes)
  return layer_norm_forward(sum, norm_weight, norm_bias, std::nullopt, eps);
}

}  // namespace

void add_embeddings_functions(PyObject* module) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  auto m = py::reinterpret_borrow<py::module_>(module);
  m.def("embeddings_forward", &embeddings_forward, "input_ids"_a, "token_type_ids"_a,
        "position_ids"_a, "word"_a, "token_type"_a, "position"_a, "norm_weight"_a, "norm_bias"_a,
        "eps"_a, py::call_guard<py::gil_scoped_release>());
}

}  // namespace transfuse
