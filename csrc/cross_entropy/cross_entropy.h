// Shared argument validation and helpers for the cross_entropy kernels (CPU and CUDA).
//
// Invariants: logits/hidden/weight/bias are float32, bfloat16 or float16 of one dtype and device; labels are
// int64 (N,); a label is ignore_index or in [0, V) (the value range is checked by the kernels, which read the
// labels anyway); label_smoothing is in [0, 1]; reduction is 0 = none, 1 = mean, 2 = sum (at::Reduction).
#pragma once
#include <optional>

#include "../checks.h"

namespace fastllm {

enum CeReduction : int64_t { kCeNone = 0, kCeMean = 1, kCeSum = 2 };

inline void check_ce_labels(const at::Tensor& labels, int64_t rows, const at::Device& dev) {
  CHECK_DTYPE(labels, at::kLong);
  CHECK_CONTIGUOUS(labels);
  FASTLLM_CHECK(labels.dim() == 1 && labels.size(0) == rows, "labels must have shape (", rows, ",), got ",
                labels.sizes());
  FASTLLM_CHECK(labels.device() == dev, "labels is on ", labels.device(), " but expected ", dev);
}

inline void check_ce_smoothing(double label_smoothing) {
  FASTLLM_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must be in [0, 1], got ",
                label_smoothing);
}

inline void check_cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& labels, double label_smoothing) {
  CHECK_FLOATING(logits);
  CHECK_CONTIGUOUS(logits);
  FASTLLM_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must have shape (N, V) with V > 0, got ",
                logits.sizes());
  check_ce_labels(labels, logits.size(0), logits.device());
  check_ce_smoothing(label_smoothing);
}

inline void check_cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                    const at::Tensor& lse, double label_smoothing) {
  check_cross_entropy_fwd(logits, labels, label_smoothing);
  const int64_t rows = logits.size(0);
  for (const auto* t : {&grad_loss, &lse}) {
    const char* name = t == &grad_loss ? "grad_loss" : "lse";
    FASTLLM_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    FASTLLM_CHECK(t->dim() == 1 && t->size(0) == rows, name, " must have shape (", rows, ",), got ", t->sizes());
    FASTLLM_CHECK(t->device() == logits.device(), name, " is on ", t->device(), " but logits on ", logits.device());
  }
}

// Validates the linear_cross_entropy inputs; returns (N, H, V).
inline std::tuple<int64_t, int64_t, int64_t> check_linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, double label_smoothing, int64_t chunk_size) {
  CHECK_FLOATING(hidden);
  CHECK_CONTIGUOUS(hidden);
  CHECK_CONTIGUOUS(weight);
  FASTLLM_CHECK(hidden.dim() == 2, "hidden must have shape (N, H), got ", hidden.sizes());
  FASTLLM_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) > 0,
                "weight must have shape (V, ", hidden.size(1), ") with V > 0, got ", weight.sizes());
  FASTLLM_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight dtype ", weight.scalar_type(),
                " != hidden dtype ", hidden.scalar_type());
  FASTLLM_CHECK(weight.device() == hidden.device(), "weight is on ", weight.device(), " but hidden on ",
                hidden.device());
  if (bias.has_value()) {
    FASTLLM_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (", weight.size(0),
                  ",), got ", bias->sizes());
    FASTLLM_CHECK(bias->scalar_type() == hidden.scalar_type(), "bias dtype ", bias->scalar_type(),
                  " != hidden dtype ", hidden.scalar_type());
    FASTLLM_CHECK(bias->device() == hidden.device(), "bias is on ", bias->device(), " but hidden on ",
                  hidden.device());
    CHECK_CONTIGUOUS(bias.value());
  }
  check_ce_labels(labels, hidden.size(0), hidden.device());
  check_ce_smoothing(label_smoothing);
  FASTLLM_CHECK(chunk_size > 0, "chunk_size must be > 0, got ", chunk_size);
  return {hidden.size(0), hidden.size(1), weight.size(0)};
}

inline void check_reduction(int64_t reduction) {
  FASTLLM_CHECK(reduction == kCeNone || reduction == kCeMean || reduction == kCeSum,
                "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// linear_cross_entropy_fwd_into: an fp32 weight, a (V, H) fp32 contiguous grad_weight beside it, mean or sum.
inline void check_lce_into(const at::Tensor& weight, const at::Tensor& grad_weight, int64_t reduction) {
  FASTLLM_CHECK(reduction == kCeMean || reduction == kCeSum,
                "linear_cross_entropy_fwd_into needs reduction 1 (mean) or 2 (sum), got ", reduction);
  FASTLLM_CHECK(weight.scalar_type() == at::kFloat, "linear_cross_entropy_fwd_into needs a float32 weight, got ",
                weight.scalar_type());
  FASTLLM_CHECK(grad_weight.scalar_type() == at::kFloat, "grad_weight must be float32, got ",
                grad_weight.scalar_type());
  FASTLLM_CHECK(grad_weight.sizes() == weight.sizes(), "grad_weight must have shape ", weight.sizes(), ", got ",
                grad_weight.sizes());
  FASTLLM_CHECK(grad_weight.device() == weight.device(), "grad_weight is on ", grad_weight.device(),
                " but weight on ", weight.device());
  CHECK_CONTIGUOUS(grad_weight);
}

// Host-side tensors of linear_cross_entropy over the M kept rows (shared by the CPU and CUDA kernels).
struct LceTensors {
  at::Tensor h, labels, scale;  // (M, H), (M,), (M,) fp32 or undefined
  at::Tensor gh, gw, gb;        // (M, H) input dtype, (V, H) fp32, (V,) fp32; undefined when not wanted
  bool gw_overwrite = false;    // gw holds stale values: the first chunk writes it (beta 0) instead of adding
};

// Indices of the rows whose label is not ignore_index; undefined when no row is ignored.
inline at::Tensor kept_rows(const at::Tensor& labels, int64_t ignore_index) {
  auto keep = labels.ne(ignore_index);  // (N,) bool
  const int64_t m = keep.sum().item<int64_t>();
  return m == labels.numel() ? at::Tensor() : keep.nonzero().squeeze(1);  // (M,)
}

inline at::Tensor gather(const at::Tensor& t, const at::Tensor& idx) { return idx.defined() ? t.index_select(0, idx) : t; }

// A (M, ...) tensor of gathered rows scattered back into (N, ...) zeros.
inline at::Tensor scatter_rows(const at::Tensor& sel, const at::Tensor& idx, int64_t rows) {
  if (!idx.defined()) return sel;
  auto sizes = sel.sizes().vec();
  sizes[0] = rows;
  return at::zeros(sizes, sel.options()).index_copy_(0, idx, sel);
}

inline LceTensors gather_inputs(const at::Tensor& hidden, const at::Tensor& labels, const at::Tensor& idx) {
  LceTensors t;
  t.h = gather(hidden, idx).contiguous();        // (M, H)
  t.labels = gather(labels, idx).contiguous();  // (M,)
  return t;
}

inline void alloc_grads(LceTensors& t, const at::Tensor& w, bool has_bias, bool with_gw = true) {
  auto f32 = w.options().dtype(at::kFloat);
  t.gh = at::empty_like(t.h);                   // (M, H)
  if (with_gw) t.gw = at::zeros({w.size(0), w.size(1)}, f32);  // (V, H)
  if (has_bias) t.gb = at::zeros({w.size(0)}, f32);  // (V,)
}

}  // namespace fastllm
