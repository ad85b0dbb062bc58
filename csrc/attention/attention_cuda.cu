// Fused attention (FlashAttention-2) for NVIDIA GPUs, sm_80 and newer, on tensor cores through WMMA.
//
// dtypes: bfloat16 and float16 (16x16x16 WMMA, fp32 accumulation); head dims 32, 64 and 128. Layouts, masks,
//   varlen and the dropout hash: attention.h (the same hash as the CPU, Triton and reference backends).
// Forward: one block of 4 warps per (kFwdM query rows, b*H + h). Q, K, V tiles in shared memory; per key block
//   S = Q K^T (WMMA, fp32 in smem), then one thread per row applies the causal/padding masks, the online softmax
//   (running max, sum; the O rows in smem are rescaled) and the dropout mask, writes P in 16 bit; O += P V (WMMA
//   accumulating into the fp32 O tile in smem). out = O / l; lse = m + log l (fp32); rows with no allowed key get
//   out = 0, lse = +inf.
// Backward: delta = rowsum(dO o O) is computed by the caller (torch, O(B*H*T)). Kernel 1, one block per
//   (kBwdN keys, b*Hkv + kv head), owns dK/dV (fp32 in smem) and loops over the group's query heads and query
//   blocks: S, dP = dO V^T (WMMA), then per row P = exp(S - lse), Pd = P o M, dS = P o (dP o M - delta), then
//   dV += Pd^T dO, dK += dS^T Q (WMMA). Kernel 2, one block per (kFwdM query rows, b*H + h), owns dQ: dQ += dS K.
//   No atomics: deterministic.
// Status: compiled for sm_80/sm_90 in CI; verified only by scripts/gpu_check.sh on a GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "attention.h"

namespace fastllm {
namespace {

using namespace nvcuda;
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kFwdM = 64, kFwdN = 64, kBwdM = 32, kBwdN = 64;

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

struct Args {
  AttnDims d;
  const void *q, *k, *v, *dout;
  const float *lse_in, *delta;
  const bool* mask;
  const int32_t *cu_q, *cu_k;
  void *out, *dq, *dk, *dv;
  float* lse;
  bool causal;
  float scale, drop_inv;
  uint32_t drop_thr;
  bool dropout;
  uint64_t seed;
};

// Copies `rows` rows (row stride rs in global memory) of D elements into smem (row stride ld); zero past n.
template <typename T, int D>
__device__ void load_tile(T* dst, int ld, const T* src, int64_t rs, int rows, int64_t n) {
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D, c = i % D;
    dst[r * ld + c] = r < n ? src[r * rs + c] : from_f<T>(0.f);
  }
}

// C (M x N, fp32, ldc) = A (M x K, ld a) * op(B) with WMMA tiles split over the warps. B_COL: B is stored
// (N x K) row-major (so op(B) = B^T); otherwise (K x N). A_COL: A stored (K x M) row-major (op(A) = A^T).
// ACC: accumulate into C instead of overwriting it.
template <typename T, int M, int N, int K, bool A_COL, bool B_COL, bool ACC>
__device__ void mma_tile(float* c, int ldc, const T* a, int lda, const T* b, int ldb) {
  using ALay = std::conditional_t<A_COL, wmma::col_major, wmma::row_major>;
  using BLay = std::conditional_t<B_COL, wmma::col_major, wmma::row_major>;
  const int warp = threadIdx.x / 32;
  for (int t = warp; t < (M / 16) * (N / 16); t += kWarps) {
    const int tm = t / (N / 16), tn = t % (N / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (ACC) {
      wmma::load_matrix_sync(acc, c + tm * 16 * ldc + tn * 16, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.f);
    }
    for (int kk = 0; kk < K; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALay> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLay> fb;
      wmma::load_matrix_sync(fa, A_COL ? a + kk * lda + tm * 16 : a + tm * 16 * lda + kk, lda);
      wmma::load_matrix_sync(fb, B_COL ? b + tn * 16 * ldb + kk : b + kk * ldb + tn * 16, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + tm * 16 * ldc + tn * 16, acc, ldc, wmma::mem_row_major);
  }
}

// Whether query row i (< lq) may attend key j of sequence b.
__device__ __forceinline__ bool allowed(const Args& a, int64_t b, int64_t i, int64_t j, const HeadView& hv) {
  if (j >= hv.lk || i >= hv.lq) return false;
  if (a.causal && j > i + hv.lk - hv.lq) return false;
  return a.mask == nullptr || a.mask[b * a.d.Tk + j];
}

__device__ __forceinline__ float keep_scale(const Args& a, uint32_t rk, int64_t j) {
  return (elem_hash(rk, static_cast<uint32_t>(j)) >> 8) >= a.drop_thr ? a.drop_inv : 0.f;
}

constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

template <int D>
struct FwdSmem {
  static constexpr int LDH = D + 8, LDS = kFwdN + 4, LDP = kFwdN + 8, LDO = D + 4;
  static constexpr int q = 0, k = q + align128(kFwdM * LDH * 2), v = k + align128(kFwdN * LDH * 2);
  static constexpr int s = v + align128(kFwdN * LDH * 2), p = s + align128(kFwdM * LDS * 4);
  static constexpr int o = p + align128(kFwdM * LDP * 2), stats = o + align128(kFwdM * LDO * 4);
  static constexpr int bytes = stats + 2 * kFwdM * 4;
};

// One row of the online softmax for key block j0; thread r owns row r.
template <typename T, int D>
__device__ void fwd_row(const Args& a, const HeadView& hv, int64_t b, uint32_t hk, int64_t i, int64_t j0,
                        float* s, T* p, float* o, float& m, float& l) {
  float mx = m;
  for (int c = 0; c < kFwdN; ++c) {
    s[c] = allowed(a, b, i, j0 + c, hv) ? s[c] * a.scale : -INFINITY;
    mx = fmaxf(mx, s[c]);
  }
  const float msafe = mx == -INFINITY ? 0.f : mx, corr = __expf(m - msafe);
  const uint32_t rk = row_key(hk, static_cast<uint32_t>(i));
  float sum = 0.f;
  for (int c = 0; c < kFwdN; ++c) {
    const float e = __expf(s[c] - msafe);
    sum += e;
    p[c] = from_f<T>(a.dropout ? e * keep_scale(a, rk, j0 + c) : e);
  }
  l = l * corr + sum;
  m = mx;
  for (int c = 0; c < D; ++c) o[c] *= corr;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fwd_kernel(Args a) {
  using L = FwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T *sq = reinterpret_cast<T*>(smem + L::q), *sk = reinterpret_cast<T*>(smem + L::k);
  T *sv = reinterpret_cast<T*>(smem + L::v), *sp = reinterpret_cast<T*>(smem + L::p);
  float *ss = reinterpret_cast<float*>(smem + L::s), *so = reinterpret_cast<float*>(smem + L::o);
  float *sm = reinterpret_cast<float*>(smem + L::stats), *sl = sm + kFwdM;
  const int64_t bh = blockIdx.y, b = bh / a.d.H, h = bh % a.d.H, i0 = int64_t(blockIdx.x) * kFwdM;
  const HeadView hv = head_view(a.d, a.cu_q, a.cu_k, b, h);
  if (i0 >= hv.lq) return;
  const T *q = static_cast<const T*>(a.q) + hv.q, *k = static_cast<const T*>(a.k) + hv.k;
  const T* v = static_cast<const T*>(a.v) + hv.k;
  load_tile<T, D>(sq, L::LDH, q + i0 * hv.q_rs, hv.q_rs, kFwdM, hv.lq - i0);
  for (int i = threadIdx.x; i < kFwdM * L::LDO; i += kThreads) so[i] = 0.f;
  if (threadIdx.x < kFwdM) sm[threadIdx.x] = -INFINITY, sl[threadIdx.x] = 0.f;
  const uint32_t hk = head_key(a.seed, static_cast<uint32_t>(bh));
  const int64_t kend = a.causal ? min(hv.lk, i0 + kFwdM + hv.lk - hv.lq) : hv.lk;
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdN) {
    __syncthreads();
    load_tile<T, D>(sk, L::LDH, k + j0 * hv.k_rs, hv.k_rs, kFwdN, hv.lk - j0);
    load_tile<T, D>(sv, L::LDH, v + j0 * hv.k_rs, hv.k_rs, kFwdN, hv.lk - j0);
    __syncthreads();
    mma_tile<T, kFwdM, kFwdN, D, false, true, false>(ss, L::LDS, sq, L::LDH, sk, L::LDH);
    __syncthreads();
    const int r = threadIdx.x;
    if (r < kFwdM)
      fwd_row<T, D>(a, hv, b, hk, i0 + r, j0, ss + r * L::LDS, sp + r * L::LDP, so + r * L::LDO, sm[r], sl[r]);
    __syncthreads();
    mma_tile<T, kFwdM, D, kFwdN, false, false, true>(so, L::LDO, sp, L::LDP, sv, L::LDH);
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + hv.q + i0 * hv.q_rs;
  for (int idx = threadIdx.x; idx < kFwdM * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    if (i0 + r >= hv.lq) continue;
    const float l = sl[r];
    out[r * hv.q_rs + c] = from_f<T>(l == 0.f ? 0.f : so[r * L::LDO + c] / l);
    if (c == 0) a.lse[hv.lse + i0 + r] = l == 0.f ? INFINITY : sm[r] + __logf(l);
  }
}

// ------------------------------------------------------------------------------------------------- backward
template <int D, int BM, int BN>
struct BwdSmem {
  static constexpr int LDH = D + 8, LDS = BN + 4, LDP = BN + 8, LDA = D + 4;
  static constexpr int q = 0, g = q + align128(BM * LDH * 2), k = g + align128(BM * LDH * 2);
  static constexpr int v = k + align128(BN * LDH * 2), s = v + align128(BN * LDH * 2);
  static constexpr int dp = s + align128(BM * LDS * 4), ph = dp + align128(BM * LDS * 4);
  static constexpr int dsh = ph + align128(BM * LDP * 2), acc1 = dsh + align128(BM * LDP * 2);
  static constexpr int acc_rows = BN > BM ? BN : BM;
  static constexpr int acc2 = acc1 + align128(acc_rows * LDA * 4), bytes = acc2 + align128(acc_rows * LDA * 4);
};

// Per row of a (BM x BN) tile: P, Pd (to ph), dS (to dsh). Thread r owns row r.
template <typename T, int BN>
__device__ void bwd_row(const Args& a, const HeadView& hv, int64_t b, uint32_t hk, int64_t i, int64_t j0,
                        const float* s, const float* dp, T* ph, T* dsh) {
  const float lse = i < hv.lq ? a.lse_in[hv.lse + i] : INFINITY;
  const float delta = i < hv.lq ? a.delta[hv.lse + i] : 0.f;
  const uint32_t rk = row_key(hk, static_cast<uint32_t>(i));
  for (int c = 0; c < BN; ++c) {
    const bool ok = allowed(a, b, i, j0 + c, hv) && lse != INFINITY;
    const float p = ok ? __expf(s[c] * a.scale - lse) : 0.f;
    const float m = a.dropout ? keep_scale(a, rk, j0 + c) : 1.f;
    ph[c] = from_f<T>(p * m);
    dsh[c] = from_f<T>(p * (dp[c] * m - delta));
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(Args a) {
  using L = BwdSmem<D, kBwdM, kBwdN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T *sq = reinterpret_cast<T*>(smem + L::q), *sg = reinterpret_cast<T*>(smem + L::g);
  T *sk = reinterpret_cast<T*>(smem + L::k), *sv = reinterpret_cast<T*>(smem + L::v);
  T *sph = reinterpret_cast<T*>(smem + L::ph), *sds = reinterpret_cast<T*>(smem + L::dsh);
  float *ss = reinterpret_cast<float*>(smem + L::s), *sdp = reinterpret_cast<float*>(smem + L::dp);
  float *sdk = reinterpret_cast<float*>(smem + L::acc1), *sdv = reinterpret_cast<float*>(smem + L::acc2);
  const int64_t G = a.d.H / a.d.Hkv, b = blockIdx.y / a.d.Hkv, hkv = blockIdx.y % a.d.Hkv;
  const int64_t j0 = int64_t(blockIdx.x) * kBwdN;
  const HeadView kv = head_view(a.d, a.cu_q, a.cu_k, b, hkv * G);
  if (j0 >= kv.lk) return;
  load_tile<T, D>(sk, L::LDH, static_cast<const T*>(a.k) + kv.k + j0 * kv.k_rs, kv.k_rs, kBwdN, kv.lk - j0);
  load_tile<T, D>(sv, L::LDH, static_cast<const T*>(a.v) + kv.k + j0 * kv.k_rs, kv.k_rs, kBwdN, kv.lk - j0);
  for (int i = threadIdx.x; i < kBwdN * L::LDA; i += kThreads) sdk[i] = 0.f, sdv[i] = 0.f;
  for (int64_t h = hkv * G; h < (hkv + 1) * G; ++h) {
    const HeadView hv = head_view(a.d, a.cu_q, a.cu_k, b, h);
    const uint32_t hk = head_key(a.seed, static_cast<uint32_t>(b * a.d.H + h));
    const int64_t first = a.causal ? max(int64_t(0), j0 - (hv.lk - hv.lq)) / kBwdM * kBwdM : 0;
    for (int64_t i0 = first; i0 < hv.lq; i0 += kBwdM) {
      __syncthreads();
      load_tile<T, D>(sq, L::LDH, static_cast<const T*>(a.q) + hv.q + i0 * hv.q_rs, hv.q_rs, kBwdM, hv.lq - i0);
      load_tile<T, D>(sg, L::LDH, static_cast<const T*>(a.dout) + hv.q + i0 * hv.q_rs, hv.q_rs, kBwdM, hv.lq - i0);
      __syncthreads();
      mma_tile<T, kBwdM, kBwdN, D, false, true, false>(ss, L::LDS, sq, L::LDH, sk, L::LDH);   // S = Q K^T
      mma_tile<T, kBwdM, kBwdN, D, false, true, false>(sdp, L::LDS, sg, L::LDH, sv, L::LDH);  // dO V^T
      __syncthreads();
      const int r = threadIdx.x;
      if (r < kBwdM)
        bwd_row<T, kBwdN>(a, hv, b, hk, i0 + r, j0, ss + r * L::LDS, sdp + r * L::LDS, sph + r * L::LDP,
                          sds + r * L::LDP);
      __syncthreads();
      mma_tile<T, kBwdN, D, kBwdM, true, false, true>(sdv, L::LDA, sph, L::LDP, sg, L::LDH);  // dV += Pd^T dO
      mma_tile<T, kBwdN, D, kBwdM, true, false, true>(sdk, L::LDA, sds, L::LDP, sq, L::LDH);  // dK += dS^T Q
    }
  }
  __syncthreads();
  T *dk = static_cast<T*>(a.dk) + kv.k + j0 * kv.k_rs, *dv = static_cast<T*>(a.dv) + kv.k + j0 * kv.k_rs;
  for (int idx = threadIdx.x; idx < kBwdN * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    if (j0 + r >= kv.lk) continue;
    dk[r * kv.k_rs + c] = from_f<T>(sdk[r * L::LDA + c] * a.scale);
    dv[r * kv.k_rs + c] = from_f<T>(sdv[r * L::LDA + c]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(Args a) {
  using L = BwdSmem<D, kFwdM, kBwdM>;  // kFwdM query rows, kBwdM keys per step
  extern __shared__ __align__(128) unsigned char smem[];
  T *sq = reinterpret_cast<T*>(smem + L::q), *sg = reinterpret_cast<T*>(smem + L::g);
  T *sk = reinterpret_cast<T*>(smem + L::k), *sv = reinterpret_cast<T*>(smem + L::v);
  T *sph = reinterpret_cast<T*>(smem + L::ph), *sds = reinterpret_cast<T*>(smem + L::dsh);
  float *ss = reinterpret_cast<float*>(smem + L::s), *sdp = reinterpret_cast<float*>(smem + L::dp);
  float* sdq = reinterpret_cast<float*>(smem + L::acc1);
  const int64_t bh = blockIdx.y, b = bh / a.d.H, h = bh % a.d.H, i0 = int64_t(blockIdx.x) * kFwdM;
  const HeadView hv = head_view(a.d, a.cu_q, a.cu_k, b, h);
  if (i0 >= hv.lq) return;
  load_tile<T, D>(sq, L::LDH, static_cast<const T*>(a.q) + hv.q + i0 * hv.q_rs, hv.q_rs, kFwdM, hv.lq - i0);
  load_tile<T, D>(sg, L::LDH, static_cast<const T*>(a.dout) + hv.q + i0 * hv.q_rs, hv.q_rs, kFwdM, hv.lq - i0);
  for (int i = threadIdx.x; i < kFwdM * L::LDA; i += kThreads) sdq[i] = 0.f;
  const uint32_t hk = head_key(a.seed, static_cast<uint32_t>(bh));
  const int64_t kend = a.causal ? min(hv.lk, i0 + kFwdM + hv.lk - hv.lq) : hv.lk;
  for (int64_t j0 = 0; j0 < kend; j0 += kBwdM) {
    __syncthreads();
    load_tile<T, D>(sk, L::LDH, static_cast<const T*>(a.k) + hv.k + j0 * hv.k_rs, hv.k_rs, kBwdM, hv.lk - j0);
    load_tile<T, D>(sv, L::LDH, static_cast<const T*>(a.v) + hv.k + j0 * hv.k_rs, hv.k_rs, kBwdM, hv.lk - j0);
    __syncthreads();
    mma_tile<T, kFwdM, kBwdM, D, false, true, false>(ss, L::LDS, sq, L::LDH, sk, L::LDH);
    mma_tile<T, kFwdM, kBwdM, D, false, true, false>(sdp, L::LDS, sg, L::LDH, sv, L::LDH);
    __syncthreads();
    const int r = threadIdx.x;
    if (r < kFwdM)
      bwd_row<T, kBwdM>(a, hv, b, hk, i0 + r, j0, ss + r * L::LDS, sdp + r * L::LDS, sph + r * L::LDP,
                        sds + r * L::LDP);
    __syncthreads();
    mma_tile<T, kFwdM, D, kBwdM, false, false, true>(sdq, L::LDA, sds, L::LDP, sk, L::LDH);  // dQ += dS K
  }
  __syncthreads();
  T* dq = static_cast<T*>(a.dq) + hv.q + i0 * hv.q_rs;
  for (int idx = threadIdx.x; idx < kFwdM * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    if (i0 + r < hv.lq) dq[r * hv.q_rs + c] = from_f<T>(sdq[r * L::LDA + c] * a.scale);
  }
}

// ------------------------------------------------------------------------------------------------- host
template <typename K>
void launch(K kernel, dim3 grid, int bytes, const Args& a) {
  if (grid.x == 0 || grid.y == 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn.template operator()<T, D>() for the tensor's dtype and head dim.
template <typename F>
void dispatch(const at::Tensor& q, int64_t d, F&& fn) {
  FASTLLM_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                "the cuda attention kernel supports float16 and bfloat16, got ", q.scalar_type());
  FASTLLM_CHECK(d == 32 || d == 64 || d == 128, "the cuda attention kernel supports head dims 32, 64, 128, got ", d);
  const bool half = q.scalar_type() == at::kHalf;
  if (d == 32) half ? fn.template operator()<__half, 32>() : fn.template operator()<__nv_bfloat16, 32>();
  if (d == 64) half ? fn.template operator()<__half, 64>() : fn.template operator()<__nv_bfloat16, 64>();
  if (d == 128) half ? fn.template operator()<__half, 128>() : fn.template operator()<__nv_bfloat16, 128>();
}

Args make_args(const AttnDims& d, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
               const std::optional<at::Tensor>& cu_k, bool causal, double p, double scale, int64_t seed) {
  Args a{};
  a.d = d;
  a.mask = mask ? mask->data_ptr<bool>() : nullptr;
  a.cu_q = cu_q ? cu_q->data_ptr<int32_t>() : nullptr;
  a.cu_k = cu_k ? cu_k->data_ptr<int32_t>() : nullptr;
  a.causal = causal, a.scale = static_cast<float>(scale), a.dropout = p > 0;
  a.drop_inv = p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.f;
  a.drop_thr = dropout_threshold(p), a.seed = static_cast<uint64_t>(seed);
  return a;
}

int64_t blocks(int64_t n, int64_t per) { return (n + per - 1) / per; }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
    bool causal, double dropout_p, double scale, int64_t seed) {
  const AttnDims d = check_attention(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse = d.varlen ? at::empty({d.H, d.total_q}, f32) : at::empty({d.B, d.H, d.Tq}, f32);
  Args a = make_args(d, mask, cu_q, cu_k, causal, dropout_p, scale, seed);
  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr(), a.out = out.data_ptr(), a.lse = lse.data_ptr<float>();
  const dim3 grid(blocks(d.Tq, kFwdM), d.B * d.H);
  dispatch(q, d.D, [&]<typename T, int D>() { launch(fwd_kernel<T, D>, grid, FwdSmem<D>::bytes, a); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, bool causal, double dropout_p,
    double scale, int64_t seed) {
  const AttnDims d = check_attention(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p);
  check_attention_bwd(d, q, dout, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);  // (B, H, Tq) or (total_q, H)
  if (d.varlen) delta = delta.t().contiguous();                            // the layout of lse
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  Args a = make_args(d, mask, cu_q, cu_k, causal, dropout_p, scale, seed);
  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr(), a.dout = dout.data_ptr();
  a.lse_in = lse.data_ptr<float>(), a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
  const dim3 grid_kv(blocks(d.Tk, kBwdN), d.B * d.Hkv), grid_q(blocks(d.Tq, kFwdM), d.B * d.H);
  dispatch(q, d.D, [&]<typename T, int D>() {
    launch(bwd_dkdv_kernel<T, D>, grid_kv, BwdSmem<D, kBwdM, kBwdN>::bytes, a);
    launch(bwd_dq_kernel<T, D>, grid_q, BwdSmem<D, kFwdM, kBwdM>::bytes, a);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace fastllm
