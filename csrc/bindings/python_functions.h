// Each binding file adds its kernels to the module transfuse._C as Python functions (pybind11);
// module.cpp calls these while the module is created. Python calls them straight, without the
// torch dispatcher's boxing (about 5 us a call); the GIL is released while they run.
#pragma once

#include <Python.h>

namespace transfuse {

void add_norm_functions(PyObject* module);
void add_attention_functions(PyObject* module);
void add_int8_functions(PyObject* module);
void add_activation_functions(PyObject* module);
void add_linear_functions(PyObject* module);
void add_rotary_functions(PyObject* module);
void add_encoder_layer_functions(PyObject* module);
void add_decoder_layer_functions(PyObject* module);
void add_embeddings_functions(PyObject* module);

}  // namespace transfuse
