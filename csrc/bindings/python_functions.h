// Each binding file adds its kernels to the module transfuse._C as Python functions; module.cpp
// calls these while the module is created.
#pragma once

#include <Python.h>

namespace transfuse {

void add_norm_functions(PyObject* module);
void add_attention_functions(PyObject* module);
void add_int8_functions(PyObject* module);
void add_activation_functions(PyObject* module);

}  // namespace transfuse
