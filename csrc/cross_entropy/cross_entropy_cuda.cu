// Fused softmax cross-entropy, and linear + cross-entropy in row chunks, for NVIDIA GPUs (sm_80 and newer).
//
// dtypes: float32, bfloat16, float16 logits/hidden/weight/bias (one dtype); int64 labels; statistics, losses
//   and gradient sums in fp32. Same math and contracts as cross_entropy_cpu.cpp (schemas in csrc/fastllm.cpp).
// cross_entropy_fwd: one thread block per row (grid-stride over rows). Each thread keeps an online (max, sum of
//   exp) pair and sum(x) over its strided elements: one read of the row; the pairs are merged by warp shuffles
//   and shared memory. Labels out of range trip a device assert (the Python wrapper checks them first).
//   With write_grad (used by the linear op), a second walk writes scale * (softmax - s/V - (1-s) onehot) over
//   the logits in place. cross_entropy_bwd: one block per row writes the gradient from the saved lse.
// linear_cross_entropy: non-ignored rows gathered (one host sync for their count); per chunk, logits with
//   at::addmm_out (cuBLAS) into one reused (C, V) buffer, the fused kernel, then grad_h = G W (at::mm_out) and
//   grad_W += G^T h (fp32 accumulator: fp32 cuBLAS output for bf16/fp16 on torch >= 2.8, upcast operands before).
// exp/log are written to stay accurate under --use_fast_math (where expf would become __expf, whose error grows
//   with |x|): ce_exp reduces the argument by k ln2 in two parts before exp2f.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cross_entropy.h"

namespace fastllm {
namespace {

constexpr int kThreads = 512;
constexpr float kNegInf = -__builtin_huge_valf();

// exp(x) within a few ulp for every x, also under --use_fast_math.
__device__ __forceinline__ float ce_exp(float x) {
  if (x < -104.f) return 0.f;  // below the smallest denormal (and -inf)
  const float k = rintf(x * 1.4426950408889634f);
  float r = fmaf(k, -0.693145751953125f, x);  // x - k ln2, ln2 split in a 12-bit head and a tail
  r = fmaf(k, -1.428606765330187e-06f, r);
  return ldexpf(exp2f(r * 1.4426950408889634f), static_cast<int>(k));
}

struct Online {
  float m, s;  // running max and sum of exp(x - m)
};

__device__ __forceinline__ Online merge(Online a, Online b) {
  const float mx = fmaxf(a.m, b.m);
  if (mx == kNegInf) return a;
  return {mx, a.s * ce_exp(a.m - mx) + b.s * ce_exp(b.m - mx)};
}

// Block-wide merge of the (max, sum) pairs and sum of `sx`; every thread gets the result. buf: 3 x 32 floats.
__device__ Online block_reduce(Online o, float& sx, float* buf) {
  for (int off = 16; off > 0; off >>= 1) {
    o = merge(o, {__shfl_xor_sync(0xffffffffu, o.m, off), __shfl_xor_sync(0xffffffffu, o.s, off)});
    sx += __shfl_xor_sync(0xffffffffu, sx, off);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // buf may still be read by the previous row
  if (lane == 0) buf[warp] = o.m, buf[32 + warp] = o.s, buf[64 + warp] = sx;
  __syncthreads();
  o = lane < nwarps ? Online{buf[lane], buf[32 + lane]} : Online{kNegInf, 0.f};
  sx = lane < nwarps ? buf[64 + lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1) {
    o = merge(o, {__shfl_xor_sync(0xffffffffu, o.m, off), __shfl_xor_sync(0xffffffffu, o.s, off)});
    sx += __shfl_xor_sync(0xffffffffu, sx, off);
  }
  return o;
}

struct CeParams {
  const int64_t* labels;
  float *loss, *lse;   // (rows,)
  const float* scale;  // (rows,) per-row gradient scale, or null: scale0
  float scale0, smoothing;
  int64_t rows, v, ignore_index;
};

// g = scale * (exp(x - lse) - s/V - (1 - s) [j == y]) for one row; x and g may alias.
template <typename T>
__device__ void grad_row(const T* x, T* g, int64_t v, int64_t y, float lse, float scale, float smoothing) {
  const float sv = smoothing / static_cast<float>(v);
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const float p = ce_exp(static_cast<float>(x[j]) - lse);
    g[j] = static_cast<T>(scale * (p - sv - (j == y ? 1.f - smoothing : 0.f)));
  }
}

template <typename T>
__global__ void ce_fwd_kernel(T* x, CeParams p, bool write_grad) {
  __shared__ float buf[96];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    T* xr = x + row * p.v;
    const int64_t y = p.labels[row];
    CUDA_KERNEL_ASSERT(y == p.ignore_index || (y >= 0 && y < p.v));
    Online o{kNegInf, 0.f};
    float sx = 0.f;
    for (int64_t j = threadIdx.x; j < p.v; j += blockDim.x) {
      const float xv = static_cast<float>(xr[j]);
      o = merge(o, {xv, 1.f});
      sx += xv;
    }
    o = block_reduce(o, sx, buf);
    const float lse = o.m + log1pf(o.s - 1.f);  // s >= 1 (the max term): log1p stays accurate under fast math
    const bool keep = y != p.ignore_index;
    if (threadIdx.x == 0) {
      const float xy = keep ? static_cast<float>(xr[y]) : 0.f;
      p.lse[row] = lse;
      p.loss[row] = keep ? (1.f - p.smoothing) * (lse - xy) + p.smoothing * (lse - sx / p.v) : 0.f;
    }
    if (!write_grad) continue;
    __syncthreads();  // x[y] is read above before the row is overwritten
    const float scale = keep ? (p.scale ? p.scale[row] : p.scale0) : 0.f;
    grad_row(xr, xr, p.v, y, lse, scale, p.smoothing);
  }
}

template <typename T>
__global__ void ce_bwd_kernel(const T* x, T* g, const float* grad_loss, CeParams p) {
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t y = p.labels[row];
    CUDA_KERNEL_ASSERT(y == p.ignore_index || (y >= 0 && y < p.v));
    const float scale = y == p.ignore_index ? 0.f : grad_loss[row];
    grad_row(x + row * p.v, g + row * p.v, p.v, y, p.lse[row], scale, p.smoothing);
  }
}

unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, 1 << 20)); }

CeParams make_params(const at::Tensor& labels, at::Tensor& loss, at::Tensor& lse, int64_t v, int64_t ignore_index,
                     double smoothing) {
  return {labels.data_ptr<int64_t>(), loss.data_ptr<float>(), lse.data_ptr<float>(), nullptr, 1.f,
          static_cast<float>(smoothing), labels.size(0), v, ignore_index};
}

void launch_fwd(at::Tensor& logits, const CeParams& p, bool write_grad) {
  if (p.rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_fwd_cuda", [&] {
    ce_fwd_kernel<scalar_t><<<grid_for(p.rows), kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), p, write_grad);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                          int64_t ignore_index, double label_smoothing) {
  check_cross_entropy_fwd(logits, labels, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));  // (N,)
  auto lse = at::empty_like(loss);                                              // (N,)
  auto p = make_params(labels, loss, lse, logits.size(1), ignore_index, label_smoothing);
  auto x = logits;  // not written: write_grad is false
  launch_fwd(x, p, false);
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, int64_t ignore_index, double label_smoothing) {
  check_cross_entropy_bwd(grad_loss, logits, labels, lse, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto grad = at::empty_like(logits);  // (N, V)
  auto gl = grad_loss.contiguous(), ls = lse.contiguous();
  auto p = make_params(labels, ls, ls, logits.size(1), ignore_index, label_smoothing);
  if (p.rows == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_bwd_cuda", [&] {
    ce_bwd_kernel<scalar_t><<<grid_for(p.rows), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), gl.data_ptr<float>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

// ---- linear + cross-entropy ----

// grad_W += G^T h_c and grad_b += column sums of G, in fp32.
void accumulate_param_grads(const at::Tensor& g, const at::Tensor& hc, LceTensors& t) {
  if (g.scalar_type() == at::kFloat) {
    t.gw.addmm_(g.t(), hc);  // (V, H) += (V, C) @ (C, H)
  } else {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
    t.gw.add_(at::mm(g.t(), hc, at::kFloat));  // bf16/fp16 operands, fp32 accumulation and output
#else
    t.gw.addmm_(g.t().to(at::kFloat), hc.to(at::kFloat));
#endif
  }
  if (t.gb.defined()) t.gb.add_(g.sum(0, false, at::kFloat));  // (V,)
}

void lce_chunks(LceTensors& t, const at::Tensor& w, const std::optional<at::Tensor>& bias, CeParams p,
                int64_t chunk, bool want_grad) {
  const int64_t m = t.h.size(0), v = w.size(0);
  if (m == 0) return;
  auto buf = at::empty({std::min(chunk, m), v}, t.h.options());  // (C, V), reused by every chunk
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    const int64_t c = std::min(chunk, m - r0);
    auto hc = t.h.narrow(0, r0, c), lg = buf.narrow(0, 0, c);  // (c, H), (c, V)
    bias.has_value() ? at::addmm_out(lg, *bias, hc, w.t()) : at::mm_out(lg, hc, w.t());
    CeParams pc = p;
    pc.labels += r0, pc.loss += r0, pc.lse += r0, pc.rows = c;
    if (p.scale) pc.scale += r0;
    launch_fwd(lg, pc, want_grad);
    if (!want_grad) continue;
    auto ghc = t.gh.narrow(0, r0, c);
    at::mm_out(ghc, lg, w);  // (c, H) = (c, V) @ (V, H)
    accumulate_param_grads(lg, hc, t);
  }
}

at::Tensor empty0(const at::Tensor& t) { return at::empty({0}, t.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t chunk_size,
    bool compute_grad) {
  const auto [rows, hdim, v] = check_linear_cross_entropy(hidden, weight, bias, labels, label_smoothing, chunk_size);
  check_reduction(reduction);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto idx = kept_rows(labels, ignore_index);
  LceTensors t = gather_inputs(hidden, labels, idx);
  const int64_t m = t.h.size(0);
  const bool want = compute_grad && reduction != kCeNone;
  if (want) alloc_grads(t, weight, bias.has_value());
  auto loss_sel = at::empty({m}, hidden.options().dtype(at::kFloat));  // (M,)
  auto lse = at::empty_like(loss_sel);                                // (M,)
  auto p = make_params(t.labels, loss_sel, lse, v, ignore_index, label_smoothing);
  p.scale0 = reduction == kCeMean && m > 0 ? 1.f / m : 1.f;
  lce_chunks(t, weight, bias, p, chunk_size, want);
  at::Tensor loss = reduction == kCeNone ? scatter_rows(loss_sel, idx, rows) : loss_sel.sum();
  if (reduction == kCeMean) loss = loss / static_cast<double>(m);  // 0/0 = nan, as torch
  if (!want) return {loss, empty0(hidden), empty0(hidden), empty0(hidden)};
  auto gb = bias.has_value() ? t.gb.to(bias->scalar_type()) : empty0(hidden);
  return {loss, scatter_rows(t.gh, idx, rows), t.gw.to(weight.scalar_type()), gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index, double label_smoothing,
    int64_t chunk_size) {
  const auto [rows, hdim, v] = check_linear_cross_entropy(hidden, weight, bias, labels, label_smoothing, chunk_size);
  CHECK_DTYPE(grad_loss, at::kFloat);
  CHECK_SHAPE(grad_loss, rows);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto idx = kept_rows(labels, ignore_index);
  LceTensors t = gather_inputs(hidden, labels, idx);
  t.scale = gather(grad_loss, idx).contiguous();  // (M,)
  alloc_grads(t, weight, bias.has_value());
  auto loss_sel = at::empty({t.h.size(0)}, hidden.options().dtype(at::kFloat));  // (M,), recomputed, unused
  auto lse = at::empty_like(loss_sel);
  auto p = make_params(t.labels, loss_sel, lse, v, ignore_index, label_smoothing);
  p.scale = t.scale.data_ptr<float>();
  lce_chunks(t, weight, bias, p, chunk_size, true);
  auto gb = bias.has_value() ? t.gb.to(bias->scalar_type()) : empty0(hidden);
  return {scatter_rows(t.gh, idx, rows), t.gw.to(weight.scalar_type()), gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cuda);
}

}  // namespace fastllm
