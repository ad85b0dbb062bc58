// Shared argument validation for the layer_norm kernels (CPU and CUDA).
#pragma once
#include <optional>

#include "../checks.h"

namespace fastllm {

// Validates layer_norm_fwd inputs; returns the hidden size N. The row count is x.numel() / N.
inline int64_t check_layer_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& residual, double eps) {
  CHECK_FLOATING(x);
  CHECK_CONTIGUOUS(x);
  FASTLLM_CHECK(x.dim() >= 1 && x.numel() > 0, "x must be a non-empty tensor, got shape ", x.sizes());
  FASTLLM_CHECK(eps > 0, "eps must be > 0, got ", eps);
  const int64_t n = x.size(-1);
  for (const auto* p : {&weight, &bias}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = p->value();
    const char* name = p == &weight ? "weight" : "bias";
    FASTLLM_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ", t.sizes());
    FASTLLM_CHECK(t.scalar_type() == x.scalar_type(), name, " dtype ", t.scalar_type(), " != x dtype ",
                  x.scalar_type());
    FASTLLM_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
    FASTLLM_CHECK(t.is_contiguous(), name, " must be contiguous");
  }
  if (residual.has_value()) {
    const at::Tensor& r = residual.value();
    FASTLLM_CHECK(r.sizes() == x.sizes(), "residual shape ", r.sizes(), " != x shape ", x.sizes());
    FASTLLM_CHECK(r.scalar_type() == x.scalar_type(), "residual dtype ", r.scalar_type(), " != x dtype ",
                  x.scalar_type());
    FASTLLM_CHECK(r.device() == x.device(), "residual is on ", r.device(), " but x is on ", x.device());
    FASTLLM_CHECK(r.is_contiguous(), "residual must be contiguous");
  }
  return n;
}

inline void check_layer_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
                                 const at::Tensor& mean, const at::Tensor& rstd) {
  CHECK_FLOATING(h);
  CHECK_CONTIGUOUS(dy);
  CHECK_CONTIGUOUS(h);
  FASTLLM_CHECK(dy.sizes() == h.sizes(), "dy shape ", dy.sizes(), " != input shape ", h.sizes());
  FASTLLM_CHECK(dy.scalar_type() == h.scalar_type(), "dy dtype ", dy.scalar_type(), " != ", h.scalar_type());
  if (dh.has_value()) {
    FASTLLM_CHECK(dh->sizes() == h.sizes(), "dh shape ", dh->sizes(), " != input shape ", h.sizes());
    FASTLLM_CHECK(dh->scalar_type() == h.scalar_type(), "dh dtype ", dh->scalar_type(), " != ", h.scalar_type());
    CHECK_CONTIGUOUS(dh.value());
  }
  const int64_t rows = h.numel() / h.size(-1);
  CHECK_DTYPE(mean, at::kFloat);
  CHECK_DTYPE(rstd, at::kFloat);
  CHECK_SHAPE(mean, rows);
  CHECK_SHAPE(rstd, rows);
}

}  // namespace fastllm
