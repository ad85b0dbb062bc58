// Fused LayerNorm (+ optional residual add) for CPU.
//
// dtypes: float32, bfloat16, float16; statistics, normalization and gradient sums in fp32.
// Forward, per row (at::parallel_for over rows): h = x + residual (rounded to the input dtype, so the
//   statistics are those of the h that is returned), two-pass mean/variance in fp32 over an L1-resident
//   row, y = (h - mean) * rstd * w + b. mean and rstd (fp32) are saved for the backward.
// Backward, per row: xhat = (h - mean) * rstd, g = dy * w,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh.
//   dweight = sum_rows dy * xhat, dbias = sum_rows dy: each of a fixed number of row blocks writes fp32
//   partial sums into its own row of a (blocks, N) buffer; a second pass sums the blocks per column.
//   No atomics, and the result depends only on the shape and the thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "layer_norm.h"

namespace fastllm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kGrainElems = 32768;  // rows per task ~ 128 KiB of fp32: amortizes the task overhead

// A row viewed as fp32: float rows are used in place, reduced-precision rows are converted into `buf`.
template <typename T>
const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename T>
void store_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// An optional (N,) parameter as fp32, converted once per call.
template <typename T>
std::vector<float> param_float(const std::optional<at::Tensor>& p) {
  if (!p.has_value()) return {};
  std::vector<float> out(p->numel());
  at::vec::convert(p->data_ptr<T>(), out.data(), p->numel());
  return out;
}

float row_mean(const float* h, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, h, n) / n;
}

float row_rstd(const float* h, float mean, int64_t n, float eps) {
  const float var = at::vec::map_reduce_all<float>(
                        [mean](Vec v) { return (v - Vec(mean)) * (v - Vec(mean)); },
                        [](Vec& a, Vec& b) { return a + b; }, h, n) / n;
  return 1.0f / std::sqrt(var + eps);
}

void normalize_row(const float* h, const float* w, const float* b, float* out, float mean, float rstd,
                   int64_t n) {
  const Vec vm(mean), vr(rstd);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec v = (Vec::loadu(h + i) - vm) * vr;
    if (w) v = v * Vec::loadu(w + i);
    if (b) v = v + Vec::loadu(b + i);
    v.store(out + i);
  }
  for (; i < n; ++i) {
    float v = (h[i] - mean) * rstd;
    out[i] = (w ? v * w[i] : v) + (b ? b[i] : 0.0f);
  }
}

// h = x + r written to `h_out` in T; returns h as fp32 (the rounded values).
template <typename T>
const float* add_residual_row(const T* x, const T* r, T* h_out, float* buf, float* buf2, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::map2([](Vec a, Vec b) { return a + b; }, h_out, x, r, n);
    return h_out;
  } else {
    at::vec::convert(x, buf, n);
    at::vec::convert(r, buf2, n);
    at::vec::map2([](Vec a, Vec b) { return a + b; }, buf, buf, buf2, n);
    at::vec::convert(buf, h_out, n);
    at::vec::convert(h_out, buf, n);
    return buf;
  }
}

struct FwdArgs {
  int64_t rows, n;
  float eps;
  const float *w, *b;
  float *mean, *rstd;
};

template <typename T>
void fwd_rows(const FwdArgs& a, const T* x, const T* r, T* y, T* h, int64_t r0, int64_t r1) {
  std::vector<float> buf(a.n), buf2(a.n);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t off = row * a.n;
    const float* hf = r ? add_residual_row(x + off, r + off, h + off, buf.data(), buf2.data(), a.n)
                        : as_float(x + off, buf.data(), a.n);
    const float mean = row_mean(hf, a.n);
    const float rstd = row_rstd(hf, mean, a.n, a.eps);
    a.mean[row] = mean;
    a.rstd[row] = rstd;
    float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + off) : buf2.data();
    normalize_row(hf, a.w, a.b, out, mean, rstd, a.n);
    store_float(out, y + off, a.n);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps) {
  const int64_t n = check_layer_norm_fwd(x, weight, bias, residual, eps);
  const int64_t rows = x.numel() / n;
  auto y = at::empty_like(x);
  auto h = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    const auto wf = param_float<scalar_t>(weight), bf = param_float<scalar_t>(bias);
    const FwdArgs a{rows, n, static_cast<float>(eps), weight ? wf.data() : nullptr,
                    bias ? bf.data() : nullptr, mean.data_ptr<float>(), rstd.data_ptr<float>()};
    const scalar_t* r = residual ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* hp = residual ? h.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / n), [&](int64_t r0, int64_t r1) {
      fwd_rows<scalar_t>(a, x.data_ptr<scalar_t>(), r, y.data_ptr<scalar_t>(), hp, r0, r1);
    });
  });
  return {y, h, mean, rstd};
}

// Sums of g*xhat and g over a row, where g = dy * w (w may be null) and xhat = (h - mean) * rstd.
std::pair<float, float> bwd_row_sums(const float* h, const float* dy, const float* w, float mean, float rstd,
                                     int64_t n) {
  Vec acc_gx(0.f), acc_g(0.f);
  const Vec vm(mean), vr(rstd);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec g = Vec::loadu(dy + i);
    if (w) g = g * Vec::loadu(w + i);
    acc_gx = at::vec::fmadd(g, (Vec::loadu(h + i) - vm) * vr, acc_gx);
    acc_g = acc_g + g;
  }
  float gx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc_gx);
  float gs = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc_g);
  for (; i < n; ++i) {
    const float g = w ? dy[i] * w[i] : dy[i];
    gx += g * (h[i] - mean) * rstd;
    gs += g;
  }
  return {gx, gs};
}

struct BwdRow {
  const float *h, *dy, *w, *dh;
  float mean, rstd, c1, c2;  // c1 = mean(g * xhat), c2 = mean(g)
};

// dx for one row; accumulates dy*xhat and dy into the block partials (null when not wanted).
void bwd_row_apply(const BwdRow& r, float* dx, float* dw_part, float* db_part, int64_t n) {
  const Vec vm(r.mean), vr(r.rstd), vc1(r.c1), vc2(r.c2);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec dy = Vec::loadu(r.dy + i), xhat = (Vec::loadu(r.h + i) - vm) * vr;
    const Vec g = r.w ? dy * Vec::loadu(r.w + i) : dy;
    Vec d = (g - vc2 - xhat * vc1) * vr;
    if (r.dh) d = d + Vec::loadu(r.dh + i);
    d.store(dx + i);
    if (dw_part) at::vec::fmadd(dy, xhat, Vec::loadu(dw_part + i)).store(dw_part + i);
    if (db_part) (Vec::loadu(db_part + i) + dy).store(db_part + i);
  }
  for (; i < n; ++i) {
    const float xhat = (r.h[i] - r.mean) * r.rstd, g = r.w ? r.dy[i] * r.w[i] : r.dy[i];
    dx[i] = (g - r.c2 - xhat * r.c1) * r.rstd + (r.dh ? r.dh[i] : 0.0f);
    if (dw_part) dw_part[i] += r.dy[i] * xhat;
    if (db_part) db_part[i] += r.dy[i];
  }
}

struct BwdArgs {
  int64_t rows, n;
  const float *w, *mean, *rstd;
  float *dw_part, *db_part;  // (blocks, n) fp32 partial sums, or null
};

template <typename T>
void bwd_block(const BwdArgs& a, const T* dy, const T* dh, const T* h, T* dx, int64_t blk, int64_t nblk) {
  const int64_t r0 = blk * a.rows / nblk, r1 = (blk + 1) * a.rows / nblk, n = a.n;
  std::vector<float> hb(n), dyb(n), dhb(n), dxb(n);
  float* dwp = a.dw_part ? a.dw_part + blk * n : nullptr;
  float* dbp = a.db_part ? a.db_part + blk * n : nullptr;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t off = row * n;
    BwdRow r{as_float(h + off, hb.data(), n), as_float(dy + off, dyb.data(), n), a.w,
             dh ? as_float(dh + off, dhb.data(), n) : nullptr, a.mean[row], a.rstd[row], 0.f, 0.f};
    const auto [gx, gs] = bwd_row_sums(r.h, r.dy, r.w, r.mean, r.rstd, n);
    r.c1 = gx / n;
    r.c2 = gs / n;
    float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(dx + off) : dxb.data();
    bwd_row_apply(r, out, dwp, dbp, n);
    store_float(out, dx + off, n);
  }
}

// Column sums of a (blocks, n) fp32 buffer, written to `out` in T.
template <typename T>
void reduce_blocks(const float* part, int64_t nblk, int64_t n, T* out) {
  at::parallel_for(0, n, 1024, [&](int64_t c0, int64_t c1) {
    std::vector<float> acc(part + c0, part + c1);
    for (int64_t b = 1; b < nblk; ++b) {
      at::vec::map2([](Vec s, Vec v) { return s + v; }, acc.data(), acc.data(), part + b * n + c0, c1 - c0);
    }
    store_float(acc.data(), out + c0, c1 - c0);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool has_bias) {
  check_layer_norm_bwd(dy, dh, h, mean, rstd);
  const int64_t n = h.size(-1), rows = h.numel() / n;
  // Enough blocks to keep every thread busy; each block's partial row stays small next to the input.
  const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  auto dx = at::empty_like(h);
  auto opts = h.options();
  at::Tensor dw_part, db_part, dw = at::empty({0}, opts), db = at::empty({0}, opts);
  if (weight.has_value()) dw_part = at::zeros({nblk, n}, opts.dtype(at::kFloat)), dw = at::empty({n}, opts);
  if (has_bias) db_part = at::zeros({nblk, n}, opts.dtype(at::kFloat)), db = at::empty({n}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "layer_norm_bwd_cpu", [&] {
    const auto wf = param_float<scalar_t>(weight);
    const BwdArgs a{rows, n, weight ? wf.data() : nullptr, mean.data_ptr<float>(), rstd.data_ptr<float>(),
                    dw_part.defined() ? dw_part.data_ptr<float>() : nullptr,
                    db_part.defined() ? db_part.data_ptr<float>() : nullptr};
    const scalar_t* dhp = dh ? dh->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        bwd_block<scalar_t>(a, dy.data_ptr<scalar_t>(), dhp, h.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                            b, nblk);
    });
    if (a.dw_part) reduce_blocks(a.dw_part, nblk, n, dw.data_ptr<scalar_t>());
    if (a.db_part) reduce_blocks(a.db_part, nblk, n, db.data_ptr<scalar_t>());
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fastllm
