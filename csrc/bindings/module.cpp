// The Python module transfuse._C: how it was built, and the kernels as functions that the binding
// files add (python_functions.h). Plain CPython API, so this file compiles without torch headers;
// torch must be imported before the functions are called (transfuse.backends.extension does).
#include <Python.h>

#include "python_functions.h"
#include "../cpu/amx.h"
#include "../cpu/gemm.h"
#include "../cpu/int8.h"

#ifdef TRANSFUSE_WITH_CUDA
static const int with_cuda = 1;
#else
static const int with_cuda = 0;
#endif

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                 "transfuse kernels (CPU, and CUDA where built)", -1,
                                 nullptr};

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddIntConstant(module, "with_cuda", with_cuda);
    PyModule_AddIntConstant(module, "cpu_int8_dot", transfuse::cpu::has_int8_dot());
    PyModule_AddIntConstant(module, "cpu_int8_avx2", transfuse::cpu::has_int8_avx2());
    PyModule_AddIntConstant(module, "cpu_gemm", transfuse::cpu::has_gemm());
    PyModule_AddIntConstant(module, "cpu_gemm_max_rows",
                            static_cast<long>(transfuse::cpu::gemm_max_rows()));
    PyModule_AddIntConstant(module, "cpu_gemv", transfuse::cpu::has_gemv());
    PyModule_AddIntConstant(module, "cpu_gemm_bf16", transfuse::cpu::has_gemm_bf16());
    PyModule_AddIntConstant(module, "cpu_amx", transfuse::cpu::has_amx());
    transfuse::add_norm_functions(module);
    transfuse::add_attention_functions(module);
    transfuse::add_int8_functions(module);
    transfuse::add_activation_functions(module);
    transfuse::add_linear_functions(module);
    transfuse::add_rotary_functions(module);
    transfuse::add_encoder_layer_functions(module);
    transfuse::add_decoder_layer_functions(module);
    transfuse::add_embeddings_functions(module);
  }
  return module;
}
