// Shared argument validation, layout and dropout hash for the attention kernels (CPU and CUDA).
//
// Layouts: padded q (B, H, Tq, D), k/v (B, Hkv, Tk, D), lse (B, H, Tq) fp32; contiguous for CUDA, any strides
//          with a contiguous D for the CPU kernel (which allocates out and the gradients like their inputs);
//          varlen q (total_q, H, D), k/v (total_k, Hkv, D), lse (H, total_q) fp32, sequence b holds rows
//          cu_seqlens[b] .. cu_seqlens[b+1] (int32). Hkv divides H; query head h reads kv head h / (H / Hkv).
// Dropout: keep element (b*H + h, query row i, key col j) of a sequence when (hash >> 8) >= threshold, the
//   hash being the same murmur3-fmix chain as fastllm.ops.reference.dropout_keep (every backend agrees):
//   head_key / row_key / elem_hash of ../dropout/dropout.h, shared with the standalone dropout op.
#pragma once
#include <cmath>
#include <cstdint>
#include <optional>

#include "../checks.h"
#include "../dropout/dropout.h"

namespace fastllm {

// Dimensions of one call; Tq/Tk are the max sequence lengths for varlen.
struct AttnDims {
  int64_t B, H, Hkv, D, Tq, Tk, total_q, total_k;
  bool varlen;
};

// strided (the CPU kernel): any batch/head/row strides, the head dim contiguous; else (CUDA) contiguous.
inline void check_layout(const at::Tensor& t, const char* name, bool strided) {
  if (strided) {
    FASTLLM_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, name, " must have a contiguous last (head) dim, got strides ",
                  t.strides());
  } else {
    FASTLLM_CHECK(t.is_contiguous(), name, " must be contiguous");
  }
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims, bool strided) {
  CHECK_FLOATING(q);
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : (t == &k ? "k" : "v");
    FASTLLM_CHECK(t->dim() == dims, name, " must have ", dims, " dims, got shape ", t->sizes());
    FASTLLM_CHECK(t->scalar_type() == q.scalar_type(), name, " dtype ", t->scalar_type(), " != q dtype ",
                  q.scalar_type());
    FASTLLM_CHECK(t->device() == q.device(), name, " is on ", t->device(), " but q is on ", q.device());
    check_layout(*t, name, strided);
  }
  FASTLLM_CHECK(k.sizes() == v.sizes(), "k shape ", k.sizes(), " != v shape ", v.sizes());
  FASTLLM_CHECK(q.size(-1) == k.size(-1), "head dim of q (", q.size(-1), ") != head dim of k (", k.size(-1), ")");
  FASTLLM_CHECK(q.size(-1) > 0, "head dim must be > 0");
}

inline void check_cu(const at::Tensor& cu, const char* name, int64_t batch, int64_t total, int64_t max_len,
                     const at::Device& dev) {
  FASTLLM_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) == batch + 1, name,
                " must be int32 of shape (", batch + 1, ",), got ", cu.scalar_type(), " ", cu.sizes());
  FASTLLM_CHECK(cu.device() == dev, name, " is on ", cu.device(), " but q is on ", dev);
  CHECK_CONTIGUOUS(cu);
  if (!cu.is_cpu()) return;  // the Python wrapper checks device tensors (a check here would synchronize)
  const int32_t* c = cu.data_ptr<int32_t>();
  FASTLLM_CHECK(c[0] == 0 && c[batch] == total, name, " must start at 0 and end at ", total);
  for (int64_t b = 0; b < batch; ++b) {
    FASTLLM_CHECK(c[b + 1] >= c[b], name, " must be non-decreasing, but ", name, "[", b + 1, "] < [", b, "]");
    FASTLLM_CHECK(c[b + 1] - c[b] <= max_len, "sequence ", b, " of ", name, " is longer than its max_seqlen ",
                  max_len);
  }
}

inline AttnDims check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
                                const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                double dropout_p, bool strided = false) {
  FASTLLM_CHECK(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must both be given or not");
  FASTLLM_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  const bool varlen = cu_q.has_value();
  check_qkv(q, k, v, varlen ? 3 : 4, strided);
  AttnDims d{};
  d.varlen = varlen;
  d.D = q.size(-1);
  d.H = q.size(varlen ? 1 : 1);
  d.Hkv = k.size(1);
  FASTLLM_CHECK(d.Hkv > 0 && d.H % d.Hkv == 0, "the number of query heads (", d.H,
                ") must be a multiple of the number of kv heads (", d.Hkv, ")");
  if (varlen) {
    FASTLLM_CHECK(!mask.has_value(), "key_padding_mask is not supported with cu_seqlens");
    d.B = cu_q->numel() - 1, d.Tq = max_q, d.Tk = max_k, d.total_q = q.size(0), d.total_k = k.size(0);
    check_cu(*cu_q, "cu_seqlens_q", d.B, d.total_q, max_q, q.device());
    check_cu(*cu_k, "cu_seqlens_k", d.B, d.total_k, max_k, q.device());
  } else {
    d.B = q.size(0), d.Tq = q.size(2), d.Tk = k.size(2), d.total_q = d.B * d.Tq, d.total_k = d.B * d.Tk;
    FASTLLM_CHECK(k.size(0) == d.B, "batch of k (", k.size(0), ") != batch of q (", d.B, ")");
  }
  if (mask.has_value()) {
    FASTLLM_CHECK(mask->scalar_type() == at::kBool, "key_padding_mask must be bool, got ", mask->scalar_type());
    CHECK_SHAPE(*mask, d.B, d.Tk);
    CHECK_CONTIGUOUS(*mask);
    FASTLLM_CHECK(mask->device() == q.device(), "key_padding_mask is on ", mask->device(), " but q is on ",
                  q.device());
  }
  return d;
}

inline void check_attention_bwd(const AttnDims& d, const at::Tensor& q, const at::Tensor& dout,
                                const at::Tensor& out, const at::Tensor& lse, bool strided = false) {
  for (const auto* t : {&dout, &out}) {
    const char* name = t == &dout ? "dout" : "out";
    FASTLLM_CHECK(t->sizes() == q.sizes(), name, " shape ", t->sizes(), " != q shape ", q.sizes());
    FASTLLM_CHECK(t->scalar_type() == q.scalar_type(), name, " dtype ", t->scalar_type(), " != ", q.scalar_type());
    check_layout(*t, name, strided);
  }
  CHECK_DTYPE(lse, at::kFloat);
  CHECK_CONTIGUOUS(lse);
  if (d.varlen) {
    CHECK_SHAPE(lse, d.H, d.total_q);
  } else {
    CHECK_SHAPE(lse, d.B, d.H, d.Tq);
  }
}

// Where the rows of one (sequence b, head h) live; every index below is an element offset.
struct HeadView {
  int64_t q, k, lse;  // offsets of row 0 of q/out/dout, of k/v, of lse
  int64_t q_rs, k_rs;  // row strides of q and k
  int64_t lq, lk;      // sequence lengths
};

FASTLLM_HD HeadView head_view(const AttnDims& d, const int32_t* cu_q, const int32_t* cu_k, int64_t b, int64_t h) {
  const int64_t hk = h / (d.H / d.Hkv);
  HeadView v{};
  if (d.varlen) {
    const int64_t q0 = cu_q[b], k0 = cu_k[b];
    v.q = (q0 * d.H + h) * d.D, v.k = (k0 * d.Hkv + hk) * d.D, v.lse = h * d.total_q + q0;
    v.q_rs = d.H * d.D, v.k_rs = d.Hkv * d.D, v.lq = cu_q[b + 1] - q0, v.lk = cu_k[b + 1] - k0;
  } else {
    v.q = (b * d.H + h) * d.Tq * d.D, v.k = (b * d.Hkv + hk) * d.Tk * d.D, v.lse = (b * d.H + h) * d.Tq;
    v.q_rs = d.D, v.k_rs = d.D, v.lq = d.Tq, v.lk = d.Tk;
  }
  return v;
}

}  // namespace fastllm
