// fastllm._C: the one place where every op schema of the `fastllm` namespace is declared.
//
// Invariants:
// - Schemas live here only; kernels register with TORCH_LIBRARY_IMPL(fastllm, CPU|CUDA, m) in their own files.
// - Fake (meta) implementations and autograd formulas are registered from Python (fastllm/ops/<op>.py).
// - The module has no pybind functions: importing fastllm._C only loads the library so that the
//   static registrations run (the pattern of pytorch/extension-cpp).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastllm compiled ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastllm, m) {
  // LayerNorm over the last dim; with residual, h = x + residual is normalized and returned.
  // Returns (y, h, mean, rstd); h is an empty tensor when residual is None. mean/rstd are fp32, shape (rows,).
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of layer_norm_fwd. dh (optional) is the gradient flowing into the returned h.
  // Returns (dx, dweight, dbias); dweight/dbias are empty when weight/bias are None.
  m.def("layer_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor mean, Tensor rstd,"
        " bool has_bias) -> (Tensor, Tensor, Tensor)");
}
