// The Python module transfuse._C. Importing it loads this shared library, whose static
// initializers register the transfuse_C ops; the module itself only says how it was built.
// Plain CPython API, so this file compiles without torch headers.
#include <Python.h>

#include "../cpu/int8.h"

#ifdef TRANSFUSE_WITH_CUDA
static const int with_cuda = 1;
#else
static const int with_cuda = 0;
#endif

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                 "transfuse kernels, registered as torch.ops.transfuse_C.*", -1,
                                 nullptr};

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddIntConstant(module, "with_cuda", with_cuda);
    PyModule_AddIntConstant(module, "cpu_int8_dot", transfuse::cpu::has_int8_dot());
  }
  return module;
}
