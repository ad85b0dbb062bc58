// Standalone dropout for NVIDIA GPUs (sm_80 and newer): y[n] = keep(seed, n) ? x[n] * scale : 0 with
// scale = 1 / (1 - p), n the flat index of the contiguous x; the mask is the counter hash of dropout.h (the
// same bits as the CPU, Triton and reference backends).
//
// dtypes: float64 (fp64 math), float32, bfloat16, float16 (fp32 math with the fp32-rounded scale, rounded to
//   the input dtype). A dropped element is +0, even for inf/NaN inputs.
// Kernel: grid-stride elementwise loop, 256 threads a block, at most 8 blocks per SM; each thread keeps the
//   row key of n >> 32 in a register and recomputes it only when that changes (never below 2^32 elements).
// Numerics caveat: fastllm._C's CUDA sources build with --use_fast_math (-ftz=true), so subnormal fp32/bf16
//   values flush to zero here; for normal values the output is bit-identical to the other backends.
// Status: compiled for sm_80/sm_90 in CI (tests/test_cuda_compile.py); verified only by scripts/gpu_check.sh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "dropout.h"

namespace fastllm {
namespace {

constexpr int kThreads = 256;

template <typename T, typename A>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, uint32_t key, uint32_t thr,
                               A scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint32_t hi = 0, rk = row_key(key, 0);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t ihi = static_cast<uint32_t>(i >> 32);
    if (ihi != hi) hi = ihi, rk = row_key(key, ihi);
    const A v = static_cast<A>(x[i]) * scale;
    const bool kept = (elem_hash(rk, static_cast<uint32_t>(i)) >> 8) >= thr;
    y[i] = static_cast<T>(kept ? v : A(0));
  }
}

int num_sms(const at::Device& dev) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()));
  return sms;
}

at::Tensor dropout_fwd_cuda(const at::Tensor& x, double p, const at::Tensor& seed) {
  const DropoutArgs a = check_dropout(x, p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 8 * int64_t{num_sms(x.device())});
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_fwd_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dropout_kernel<scalar_t, A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, a.key, a.thr, static_cast<A>(a.scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) { m.impl("dropout_fwd", &dropout_fwd_cuda); }

}  // namespace fastllm
