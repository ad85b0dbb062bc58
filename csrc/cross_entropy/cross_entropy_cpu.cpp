// Fused softmax cross-entropy, and linear + cross-entropy in row chunks, for CPU.
//
// dtypes: float32, bfloat16, float16 logits/hidden/weight/bias (one dtype); int64 labels; every statistic,
//   loss and gradient sum in fp32. Per row i with logits x (V,), label y, smoothing s:
//   lse = max + log(sum_j exp(x_j - max)),  loss = (1 - s) (lse - x_y) + s (lse - mean_j x_j)   (0 if ignored),
//   d loss / d x_j = softmax_j - s / V - (1 - s) * [j == y].
// cross_entropy_fwd: per row (at::parallel_for over rows, at::vec inside), pass 1 max and sum(x), pass 2
//   sum(exp(x - max)); returns fp32 (loss, lse). cross_entropy_bwd: one pass per row writes
//   grad_loss_i * d loss_i / d x (zero on ignored rows) from the saved lse.
// linear_cross_entropy: the rows whose label is not ignore_index are gathered first (ignored rows cost no
//   matmul); per chunk of C rows, logits = h_c W^T + b (at::addmm_out into one reused (C, V) buffer, MKL), the
//   fused kernel writes the loss and overwrites the logits with scale_i * d loss_i / d logits in place, then
//   grad_h_c = G W (at::mm_out) and grad_W += G^T h_c, grad_b += sum_rows G (fp32 accumulators). At most
//   C x V logits exist at once. The forward computes the gradients of the mean/sum loss (scale 1/count or 1);
//   linear_cross_entropy_bwd recomputes them with per-row scales (reduction='none').
//   linear_cross_entropy_fwd_into (CPU only, fp32 weight, mean/sum) is the forward with compute_grad whose
//   grad_W goes into a caller's buffer: the first chunk writes it (beta-0 GEMM, no zero fill), later ones add.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cross_entropy.h"

namespace fastllm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlk = 1024;          // elements converted to fp32 at a time (4 KiB, L1-resident)
constexpr int64_t kGrainElems = 32768;  // elements per parallel task at least: amortizes the task overhead

struct RowStats {
  float max, sumexp, sumx;
};

// Calls f(fp32 pointer, offset, length) over a row in blocks; reduced-precision rows are converted into buf.
template <typename T, typename F>
void for_blocks(const T* x, int64_t n, float* buf, F&& f) {
  for (int64_t o = 0; o < n; o += kBlk) {
    const int64_t len = std::min(kBlk, n - o);
    if constexpr (std::is_same_v<T, float>) {
      f(x + o, o, len);
    } else {
      at::vec::convert(x + o, buf, len);
      f(static_cast<const float*>(buf), o, len);
    }
  }
}

// (max, sum) of p[0, len): vector lanes plus a scalar tail (exact for len < the vector width).
std::pair<float, float> max_and_sum(const float* p, int64_t len) {
  Vec vmax(-std::numeric_limits<float>::infinity()), vsum(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) {
    const Vec v = Vec::loadu(p + i);
    vmax = at::vec::maximum(vmax, v);
    vsum = vsum + v;
  }
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  float sm = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; i < len; ++i) mx = std::max(mx, p[i]), sm += p[i];
  return {mx, sm};
}

float sum_exp(const float* p, int64_t len, float mx) {
  const Vec vm(mx);
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= len; i += Vec::size()) acc = acc + (Vec::loadu(p + i) - vm).exp();
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < len; ++i) s += std::exp(p[i] - mx);
  return s;
}

template <typename T>
RowStats row_stats(const T* x, int64_t n, float* buf) {
  float mx = -std::numeric_limits<float>::infinity(), sx = 0.f, se = 0.f;
  for_blocks(x, n, buf, [&](const float* p, int64_t, int64_t len) {
    const auto [bm, bs] = max_and_sum(p, len);
    mx = std::max(mx, bm);
    sx += bs;
  });
  for_blocks(x, n, buf, [&](const float* p, int64_t, int64_t len) { se += sum_exp(p, len, mx); });
  return {mx, se, sx};
}

struct RowGrad {
  float lse, scale, smooth_v;  // smooth_v = s / V
  float hit;                   // (1 - s): subtracted (times scale) at the label
  int64_t label;
  float x_label;
};

// g = scale * (exp(x - lse) - s/V), minus scale * (1 - s) at the label. x and g may alias.
template <typename T>
void row_grad(const T* x, T* g, int64_t n, const RowGrad& r, float* buf) {
  const Vec vl(r.lse), vs(r.scale), vo(r.scale * r.smooth_v);
  for_blocks(x, n, buf, [&](const float* p, int64_t o, int64_t len) {
    float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(g + o) : buf;
    at::vec::map([&](Vec v) { return (v - vl).exp() * vs - vo; }, out, p, len);
    if constexpr (!std::is_same_v<T, float>) at::vec::convert(buf, g + o, len);
  });
  const float gy = r.scale * (std::exp(r.x_label - r.lse) - r.smooth_v - r.hit);
  g[r.label] = static_cast<T>(gy);
}

float row_loss(const RowStats& st, float x_label, float smoothing, int64_t n) {
  const float lse = st.max + std::log(st.sumexp);
  // (1 - s) * nll + s * smooth, each a difference from lse: exact zeros where torch has them (V = 1).
  return (1.f - smoothing) * (lse - x_label) + smoothing * (lse - st.sumx / static_cast<float>(n));
}

// Every label is ignore_index or in [0, n): a serial pass, before any parallel work.
void check_label_values(const at::Tensor& labels, int64_t n, int64_t ignore_index) {
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    FASTLLM_CHECK(lab[i] == ignore_index || (lab[i] >= 0 && lab[i] < n), "labels[", i, "] = ", lab[i],
                  " is out of range [0, ", n, ") and is not ignore_index (", ignore_index, ")");
  }
}

int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, kGrainElems / n); }

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                         int64_t ignore_index, double label_smoothing) {
  check_cross_entropy_fwd(logits, labels, label_smoothing);
  const int64_t rows = logits.size(0), n = logits.size(1);
  check_label_values(labels, n, ignore_index);
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));  // (N,)
  auto lse = at::empty({rows}, logits.options().dtype(at::kFloat));   // (N,)
  const float s = static_cast<float>(label_smoothing);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* lab = labels.data_ptr<int64_t>();
    float *lp = loss.data_ptr<float>(), *ep = lse.data_ptr<float>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(kBlk);
      for (int64_t i = r0; i < r1; ++i) {
        const RowStats st = row_stats(x + i * n, n, buf.data());
        ep[i] = st.max + std::log(st.sumexp);
        const bool keep = lab[i] != ignore_index;
        lp[i] = keep ? row_loss(st, static_cast<float>(x[i * n + lab[i]]), s, n) : 0.f;
      }
    });
  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, int64_t ignore_index, double label_smoothing) {
  check_cross_entropy_bwd(grad_loss, logits, labels, lse, label_smoothing);
  const int64_t rows = logits.size(0), n = logits.size(1);
  check_label_values(labels, n, ignore_index);
  auto grad = at::empty_like(logits);  // (N, V)
  const auto gl = grad_loss.contiguous(), ls = lse.contiguous();
  const float s = static_cast<float>(label_smoothing);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t* lab = labels.data_ptr<int64_t>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(kBlk);
      for (int64_t i = r0; i < r1; ++i) {
        if (lab[i] == ignore_index) {
          std::fill(g + i * n, g + (i + 1) * n, scalar_t(0));
          continue;
        }
        const RowGrad r{ls.data_ptr<float>()[i], gl.data_ptr<float>()[i], s / n, 1.f - s, lab[i],
                        static_cast<float>(x[i * n + lab[i]])};
        row_grad(x + i * n, g + i * n, n, r, buf.data());
      }
    });
  });
  return grad;
}

// ---- linear + cross-entropy ----

struct ChunkArgs {
  const int64_t* labels;  // (M,), none ignored
  const float* scale;     // (M,) per-row gradient scale, or null: `scale0` for every row
  float scale0, smoothing;
  bool want_grad;
  float* loss;  // (M,)
};

// Loss of each row of the (C, V) logits chunk; with want_grad, overwrites the logits with the scaled gradient.
template <typename T>
void ce_chunk_rows(T* lg, int64_t c, int64_t n, const ChunkArgs& a) {
  at::parallel_for(0, c, grain_rows(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(kBlk);
    for (int64_t i = r0; i < r1; ++i) {
      T* x = lg + i * n;
      const float xl = static_cast<float>(x[a.labels[i]]);
      const RowStats st = row_stats(x, n, buf.data());
      a.loss[i] = row_loss(st, xl, a.smoothing, n);
      if (!a.want_grad) continue;
      const float lse = st.max + std::log(st.sumexp);
      const RowGrad r{lse, a.scale ? a.scale[i] : a.scale0, a.smoothing / n, 1.f - a.smoothing, a.labels[i], xl};
      row_grad(x, x, n, r, buf.data());
    }
  });
}

void ce_chunk(at::Tensor& lg, const ChunkArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lg.scalar_type(), "ce_chunk_rows", [&] {
    ce_chunk_rows(lg.data_ptr<scalar_t>(), lg.size(0), lg.size(1), a);
  });
}

// grad_W += G^T h_c (= on the first chunk into a stale buffer) and grad_b += column sums of G, in fp32.
void accumulate_param_grads(const at::Tensor& g, const at::Tensor& hc, LceTensors& t, bool first) {
  if (first && t.gw_overwrite) {
    at::mm_out(t.gw, g.t(), hc);  // (V, H) = (V, C) @ (C, H); fp32 only (checked by the _into op)
  } else if (g.scalar_type() == at::kFloat) {
    t.gw.addmm_(g.t(), hc);  // (V, H) += (V, C) @ (C, H)
  } else {
    t.gw.addmm_(g.t().to(at::kFloat), hc.to(at::kFloat));  // no mixed-dtype GEMM on CPU: fp32 operands
  }
  if (t.gb.defined()) t.gb.add_(g.sum(0, false, at::kFloat));  // (V,)
}

// The chunk loop over the M gathered rows; writes the per-row loss (M,) and the wanted gradients.
void lce_chunks(LceTensors& t, const at::Tensor& w, const std::optional<at::Tensor>& bias, ChunkArgs a,
                int64_t chunk, float* loss) {
  const int64_t m = t.h.size(0), v = w.size(0);
  if (m == 0) {
    if (t.gw_overwrite) t.gw.zero_();  // no row: the gradient is zero
    return;
  }
  auto buf = at::empty({std::min(chunk, m), v}, t.h.options());  // (C, V), reused by every chunk
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    const int64_t c = std::min(chunk, m - r0);
    auto hc = t.h.narrow(0, r0, c), lg = buf.narrow(0, 0, c);  // (c, H), (c, V)
    bias.has_value() ? at::addmm_out(lg, *bias, hc, w.t()) : at::mm_out(lg, hc, w.t());
    ChunkArgs ca = a;
    ca.labels = a.labels + r0, ca.loss = loss + r0, ca.scale = a.scale ? a.scale + r0 : nullptr;
    ce_chunk(lg, ca);
    if (!a.want_grad) continue;
    auto ghc = t.gh.narrow(0, r0, c);
    at::mm_out(ghc, lg, w);  // (c, H) = (c, V) @ (V, H)
    accumulate_param_grads(lg, hc, t, r0 == 0);
  }
}

at::Tensor reduce_loss(const at::Tensor& loss_sel, const at::Tensor& idx, int64_t rows, int64_t reduction) {
  if (reduction == kCeNone) return scatter_rows(loss_sel, idx, rows);  // (N,)
  auto total = loss_sel.sum();                                         // () fp32
  return reduction == kCeSum ? total : total / static_cast<double>(loss_sel.numel());  // 0/0 = nan
}

at::Tensor empty_like_dtype(const at::Tensor& t) { return at::empty({0}, t.options()); }

// The forward's chunk loop over the kept rows; t.gw (and t.gb) allocated by the caller when want_grad.
at::Tensor lce_forward(LceTensors& t, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& idx, int64_t rows, double label_smoothing, int64_t reduction,
                       int64_t chunk_size, bool want) {
  const int64_t m = t.h.size(0);
  auto loss_sel = at::empty({m}, t.h.options().dtype(at::kFloat));  // (M,)
  const float scale0 = reduction == kCeMean && m > 0 ? 1.f / m : 1.f;
  ChunkArgs a{t.labels.data_ptr<int64_t>(), nullptr, scale0, static_cast<float>(label_smoothing), want, nullptr};
  lce_chunks(t, weight, bias, a, chunk_size, loss_sel.data_ptr<float>());
  return reduce_loss(loss_sel, idx, rows, reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t chunk_size,
    bool compute_grad) {
  const auto [rows, hdim, v] = check_linear_cross_entropy(hidden, weight, bias, labels, label_smoothing, chunk_size);
  check_reduction(reduction);
  check_label_values(labels, v, ignore_index);
  const auto idx = kept_rows(labels, ignore_index);
  LceTensors t = gather_inputs(hidden, labels, idx);
  const bool want = compute_grad && reduction != kCeNone;
  if (want) alloc_grads(t, weight, bias.has_value());
  auto loss = lce_forward(t, weight, bias, idx, rows, label_smoothing, reduction, chunk_size, want);
  if (!want) return {loss, empty_like_dtype(hidden), empty_like_dtype(hidden), empty_like_dtype(hidden)};
  auto gb = bias.has_value() ? t.gb.to(bias->scalar_type()) : empty_like_dtype(hidden);
  return {loss, scatter_rows(t.gh, idx, rows), t.gw.to(weight.scalar_type()), gb};
}

// linear_cross_entropy_fwd with compute_grad, the weight gradient written into grad_weight (fp32, stale values
// overwritten) instead of a new zero-filled tensor: for a caller that reuses that buffer across steps.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_into_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t chunk_size,
    at::Tensor& grad_weight) {
  const auto [rows, hdim, v] = check_linear_cross_entropy(hidden, weight, bias, labels, label_smoothing, chunk_size);
  check_lce_into(weight, grad_weight, reduction);
  check_label_values(labels, v, ignore_index);
  const auto idx = kept_rows(labels, ignore_index);
  LceTensors t = gather_inputs(hidden, labels, idx);
  alloc_grads(t, weight, bias.has_value(), /*with_gw=*/false);
  t.gw = grad_weight, t.gw_overwrite = true;
  auto loss = lce_forward(t, weight, bias, idx, rows, label_smoothing, reduction, chunk_size, true);
  auto gb = bias.has_value() ? t.gb : empty_like_dtype(hidden);
  return {loss, scatter_rows(t.gh, idx, rows), gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index, double label_smoothing,
    int64_t chunk_size) {
  const auto [rows, hdim, v] = check_linear_cross_entropy(hidden, weight, bias, labels, label_smoothing, chunk_size);
  CHECK_DTYPE(grad_loss, at::kFloat);
  CHECK_SHAPE(grad_loss, rows);
  check_label_values(labels, v, ignore_index);
  const auto idx = kept_rows(labels, ignore_index);
  LceTensors t = gather_inputs(hidden, labels, idx);
  t.scale = gather(grad_loss, idx).contiguous();  // (M,)
  alloc_grads(t, weight, bias.has_value());
  auto loss_sel = at::empty({t.h.size(0)}, hidden.options().dtype(at::kFloat));  // (M,), recomputed, unused
  ChunkArgs a{t.labels.data_ptr<int64_t>(), t.scale.data_ptr<float>(), 1.f, static_cast<float>(label_smoothing),
              true, nullptr};
  lce_chunks(t, weight, bias, a, chunk_size, loss_sel.data_ptr<float>());
  auto gb = bias.has_value() ? t.gb.to(bias->scalar_type()) : empty_like_dtype(hidden);
  return {scatter_rows(t.gh, idx, rows), t.gw.to(weight.scalar_type()), gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cpu);
  m.impl("linear_cross_entropy_fwd_into", &linear_cross_entropy_fwd_into_cpu);
}

}  // namespace fastllm
