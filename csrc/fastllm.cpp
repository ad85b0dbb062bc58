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
  // Fused attention (csrc/attention/attention.h has the layouts). Padded: q (B, H, Tq, D), k/v (B, Hkv, Tk, D),
  // key_padding_mask (B, Tk) bool (True = attend), cu_seqlens None. Varlen: q (total_q, H, D), k/v
  // (total_k, Hkv, D), cu_seqlens int32 (B + 1,). Returns (out, lse); lse fp32 (B, H, Tq) or (H, total_q).
  // max_seqlen_* are SymInt (the kernels take int64_t): a padded call passes Tq/Tk, which torch.compile then
  // keeps symbolic instead of specializing (recompiling) on every sequence length.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens_q,"
        " Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float dropout_p,"
        " float scale, int seed) -> (Tensor, Tensor)");
  // Gradients of attention_fwd (same arguments, plus dout, out and lse). Returns (dq, dk, dv).
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q,"
        " SymInt max_seqlen_k, bool causal, float dropout_p, float scale, int seed)"
        " -> (Tensor, Tensor, Tensor)");
  // Softmax cross-entropy of (N, V) logits against int64 labels (N,). Returns fp32 (loss, lse), shape (N,);
  // loss is 0 on rows labelled ignore_index. The reduction is done by the caller.
  m.def("cross_entropy_fwd(Tensor logits, Tensor labels, int ignore_index, float label_smoothing)"
        " -> (Tensor, Tensor)");
  // grad_logits = grad_loss[i] * d loss_i / d logits[i] (zero rows where ignored); grad_loss and lse fp32 (N,).
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor labels, Tensor lse, int ignore_index,"
        " float label_smoothing) -> Tensor");
  // cross_entropy(hidden @ weight.T + bias, labels) in row chunks of chunk_size; reduction 0 none, 1 mean, 2 sum.
  // Returns (loss, grad_hidden, grad_weight, grad_bias): loss fp32, () or (N,) for none; with compute_grad and
  // reduction != none, the gradients of the loss (fp32-accumulated, in the input dtype), else empty tensors.
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
        " float label_smoothing, int reduction, int chunk_size, bool compute_grad)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of the per-row losses weighted by grad_loss (fp32 (N,)), recomputed chunk by chunk.
  // Returns (grad_hidden, grad_weight, grad_bias); grad_bias is empty when bias is None.
  m.def("linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels,"
        " int ignore_index, float label_smoothing, int chunk_size) -> (Tensor, Tensor, Tensor)");
  // linear_cross_entropy_fwd with compute_grad and reduction mean/sum (CPU, float32 weight), the weight gradient
  // written into grad_weight ((V, H) fp32; its old values are overwritten) for a caller that reuses the buffer.
  // Returns (loss, grad_hidden, grad_bias); grad_bias is empty when bias is None.
  m.def("linear_cross_entropy_fwd_into(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
        " float label_smoothing, int reduction, int chunk_size, Tensor(a!) grad_weight) -> (Tensor, Tensor, Tensor)");
  // Dropout of a contiguous x (float32/float64/bfloat16/float16): y = keep ? x / (1 - p) : 0, the keep mask
  // a counter hash of (seed, flat index) (csrc/dropout/dropout.h). seed is a 0-d int64 CPU tensor, read on the
  // host, so a seed drawn inside a torch.compile graph needs no graph break. The backward is the same op on the
  // gradient with the same p and seed.
  m.def("dropout_fwd(Tensor x, float p, Tensor seed) -> Tensor");
}
