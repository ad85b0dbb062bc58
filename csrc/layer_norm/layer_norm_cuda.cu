// Fused LayerNorm (+ optional residual add) for NVIDIA GPUs (sm_80 and newer).
//
// dtypes: float32, bfloat16, float16; statistics and accumulation in fp32.
// Forward: one thread block per row (grid-stride over rows). Each thread reads 128-bit packs (4 fp32 or
//   8 bf16/fp16) when N and every pointer allow it, else scalars. h = x + residual is rounded to the dtype and
//   stored in the first pass; mean and variance by two block reductions (two passes over the row, the second
//   served from L1/L2); y written in a third pass. mean/rstd (fp32) are saved for the backward.
// Backward: each block owns a contiguous range of rows: per row, block reductions of sum(g*xhat) and sum(g)
//   (g = dy*w), then dx = rstd*(g - mean(g) - xhat*mean(g*xhat)) + dh. dweight/dbias stage 1: the block adds
//   dy*xhat and dy into its own fp32 row of a (blocks, N) buffer (each column owned by one thread: no atomics);
//   stage 2: a column-parallel kernel sums the blocks' rows. Deterministic for a given device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "layer_norm.h"

namespace fastllm {
namespace {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_f(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<float>(pk.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void store_f(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Sum over the block; every thread gets the result. `buf` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* buf) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // buf may still be read by a previous reduction
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = lane < nwarps ? buf[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
struct FwdParams {
  const T *x, *r, *w, *b;
  T *y, *h;
  float *mean, *rstd;
  int64_t rows;
  int n;
  float eps;
};

template <typename T, int V>
__device__ float fwd_sum_pass(const FwdParams<T>& p, int64_t off) {
  float s = 0.f;
  for (int i = threadIdx.x * V; i < p.n; i += blockDim.x * V) {
    float v[V];
    load_f<T, V>(p.x + off + i, v);
    if (p.r) {
      float rv[V];
      load_f<T, V>(p.r + off + i, rv);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = static_cast<float>(static_cast<T>(v[k] + rv[k]));
      store_f<T, V>(p.h + off + i, v);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) s += v[k];
  }
  return s;
}

template <typename T, int V>
__global__ void ln_fwd_kernel(FwdParams<T> p) {
  __shared__ float buf[32];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t off = row * p.n;
    const T* src = (p.r ? p.h : p.x) + off;  // each thread re-reads only the packs it wrote itself
    const float mu = block_sum(fwd_sum_pass<T, V>(p, off), buf) / p.n;
    float ss = 0.f;
    for (int i = threadIdx.x * V; i < p.n; i += blockDim.x * V) {
      float v[V];
      load_f<T, V>(src + i, v);
#pragma unroll
      for (int k = 0; k < V; ++k) ss += (v[k] - mu) * (v[k] - mu);
    }
    const float rs = rsqrtf(block_sum(ss, buf) / p.n + p.eps);
    for (int i = threadIdx.x * V; i < p.n; i += blockDim.x * V) {
      float v[V], w[V], b[V];
      load_f<T, V>(src + i, v);
      if (p.w) load_f<T, V>(p.w + i, w);
      if (p.b) load_f<T, V>(p.b + i, b);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = (v[k] - mu) * rs * (p.w ? w[k] : 1.f) + (p.b ? b[k] : 0.f);
      store_f<T, V>(p.y + off + i, v);
    }
    if (threadIdx.x == 0) p.mean[row] = mu, p.rstd[row] = rs;
  }
}

template <typename T>
struct BwdParams {
  const T *dy, *dh, *h, *w;
  const float *mean, *rstd;
  T* dx;
  float *dw_part, *db_part;  // (blocks, n) fp32, or null
  int64_t rows, rows_per_block;
  int n;
};

template <typename T, int V>
__device__ void bwd_row(const BwdParams<T>& p, int64_t row, float* buf) {
  const int64_t off = row * p.n;
  const float mu = p.mean[row], rs = p.rstd[row];
  float sgx = 0.f, sg = 0.f;
  for (int i = threadIdx.x * V; i < p.n; i += blockDim.x * V) {
    float h[V], dy[V], w[V];
    load_f<T, V>(p.h + off + i, h);
    load_f<T, V>(p.dy + off + i, dy);
    if (p.w) load_f<T, V>(p.w + i, w);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float g = p.w ? dy[k] * w[k] : dy[k];
      sgx += g * (h[k] - mu) * rs;
      sg += g;
    }
  }
  const float c1 = block_sum(sgx, buf) / p.n, c2 = block_sum(sg, buf) / p.n;
  float* dwp = p.dw_part ? p.dw_part + blockIdx.x * (int64_t)p.n : nullptr;
  float* dbp = p.db_part ? p.db_part + blockIdx.x * (int64_t)p.n : nullptr;
  for (int i = threadIdx.x * V; i < p.n; i += blockDim.x * V) {
    float h[V], dy[V], w[V], dh[V], dx[V];
    load_f<T, V>(p.h + off + i, h);
    load_f<T, V>(p.dy + off + i, dy);
    if (p.w) load_f<T, V>(p.w + i, w);
    if (p.dh) load_f<T, V>(p.dh + off + i, dh);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float xhat = (h[k] - mu) * rs, g = p.w ? dy[k] * w[k] : dy[k];
      dx[k] = (g - c2 - xhat * c1) * rs + (p.dh ? dh[k] : 0.f);
      if (dwp) dwp[i + k] += dy[k] * xhat;
      if (dbp) dbp[i + k] += dy[k];
    }
    store_f<T, V>(p.dx + off + i, dx);
  }
}

template <typename T, int V>
__global__ void ln_bwd_kernel(BwdParams<T> p) {
  __shared__ float buf[32];
  const int64_t r0 = blockIdx.x * p.rows_per_block;
  const int64_t r1 = r0 + p.rows_per_block < p.rows ? r0 + p.rows_per_block : p.rows;
  for (int64_t row = r0; row < r1; ++row) bwd_row<T, V>(p, row, buf);
}

// out[c] = sum_b part[b, c] for c < n (stage 2 of the dweight/dbias reduction).
template <typename T>
__global__ void reduce_cols_kernel(const float* part, int nblk, int n, T* out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float s = 0.f;
  for (int b = 0; b < nblk; ++b) s += part[(int64_t)b * n + c];
  out[c] = static_cast<T>(s);
}

// Elements per 128-bit pack when the hidden size and every pointer allow it, else 1.
template <typename T>
int pack_width(int n, std::initializer_list<const void*> ptrs) {
  const int v = 16 / sizeof(T);
  if (n % v != 0) return 1;
  for (const void* ptr : ptrs)
    if (ptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return 1;
  return v;
}

int threads_for(int n, int v) {
  const int packs = (n + v - 1) / v;
  const int t = ((packs + 31) / 32) * 32;
  return t < 32 ? 32 : (t > 512 ? 512 : t);
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
void launch_fwd(const FwdParams<T>& p, cudaStream_t stream) {
  const int v = pack_width<T>(p.n, {p.x, p.r, p.w, p.b, p.y, p.h});
  const int threads = threads_for(p.n, v);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.rows, 1 << 30));
  if (v == 16 / (int)sizeof(T))
    ln_fwd_kernel<T, 16 / sizeof(T)><<<grid, threads, 0, stream>>>(p);
  else
    ln_fwd_kernel<T, 1><<<grid, threads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps) {
  const int64_t n = check_layer_norm_fwd(x, weight, bias, residual, eps);
  FASTLLM_CHECK(n < (int64_t{1} << 31), "hidden size ", n, " is too large for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.numel() / n;
  auto y = at::empty_like(x);
  auto h = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    FwdParams<scalar_t> p{x.data_ptr<scalar_t>(), opt_ptr<scalar_t>(residual), opt_ptr<scalar_t>(weight),
                          opt_ptr<scalar_t>(bias), y.data_ptr<scalar_t>(),
                          residual ? h.data_ptr<scalar_t>() : nullptr, mean.data_ptr<float>(),
                          rstd.data_ptr<float>(), rows, static_cast<int>(n), static_cast<float>(eps)};
    launch_fwd(p, c10::cuda::getCurrentCUDAStream());
  });
  return {y, h, mean, rstd};
}

int num_sms(const at::Device& dev) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()));
  return sms;
}

template <typename T>
void launch_bwd(const BwdParams<T>& p, int nblk, cudaStream_t stream) {
  const int v = pack_width<T>(p.n, {p.dy, p.dh, p.h, p.w, p.dx});
  const int threads = threads_for(p.n, v);
  if (v == 16 / (int)sizeof(T))
    ln_bwd_kernel<T, 16 / sizeof(T)><<<nblk, threads, 0, stream>>>(p);
  else
    ln_bwd_kernel<T, 1><<<nblk, threads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void reduce_cols(const float* part, int nblk, int n, T* out, cudaStream_t stream) {
  reduce_cols_kernel<T><<<(n + 255) / 256, 256, 0, stream>>>(part, nblk, n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, bool has_bias) {
  check_layer_norm_bwd(dy, dh, h, mean, rstd);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t n = h.size(-1), rows = h.numel() / n;
  // Two blocks per SM keep the device busy while each block's partial row stays small.
  const int64_t per_block = (rows + 2 * num_sms(h.device()) - 1) / (2 * num_sms(h.device()));
  const int nblk = static_cast<int>((rows + per_block - 1) / per_block);
  auto opts = h.options();
  auto dx = at::empty_like(h);
  at::Tensor dw_part, db_part, dw = at::empty({0}, opts), db = at::empty({0}, opts);
  if (weight.has_value()) dw_part = at::zeros({nblk, n}, opts.dtype(at::kFloat)), dw = at::empty({n}, opts);
  if (has_bias) db_part = at::zeros({nblk, n}, opts.dtype(at::kFloat)), db = at::empty({n}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "layer_norm_bwd_cuda", [&] {
    BwdParams<scalar_t> p{dy.data_ptr<scalar_t>(), opt_ptr<scalar_t>(dh), h.data_ptr<scalar_t>(),
                          opt_ptr<scalar_t>(weight), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                          dx.data_ptr<scalar_t>(), dw_part.defined() ? dw_part.data_ptr<float>() : nullptr,
                          db_part.defined() ? db_part.data_ptr<float>() : nullptr, rows, per_block,
                          static_cast<int>(n)};
    launch_bwd(p, nblk, stream);
    if (p.dw_part) reduce_cols(p.dw_part, nblk, p.n, dw.data_ptr<scalar_t>(), stream);
    if (p.db_part) reduce_cols(p.db_part, nblk, p.n, db.data_ptr<scalar_t>(), stream);
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace fastllm
