// Standalone dropout for CPU: y[n] = keep(seed, n) ? x[n] * scale : 0, scale = 1 / (1 - p), n the flat index
// of the contiguous x. The mask is the counter hash of dropout.h (bit-identical to every other backend).
//
// dtypes: float64 (computed in fp64), float32, bfloat16, float16 (computed in fp32 with the fp32-rounded scale,
//   then rounded to the input dtype). A dropped element is +0 even when x is inf or NaN (a select, not a
//   multiply by 0).
// Algorithm: at::parallel_for over chunks of at least kGrain elements. Each chunk walks tiles of at most kTile
//   elements that never straddle a multiple of 2^32, so the row key (from n >> 32) is one value per tile. Per
//   tile, one fused loop: the uint32 hash of each index, the compare with the threshold, x * scale, and the
//   select written as a bitwise AND with an all-ones/all-zeros mask. The loop has no branch, so GCC
//   auto-vectorizes it with AVX-512 (16 lanes), AVX2 (8) or SSE2; about 0.2 / 0.35 / 0.9 ns per fp32 element
//   on one core of the Xeon of benchmarks/RESULTS.md (a `? v : 0` select left AVX2 code scalar). bf16/fp16
//   tiles go through fp32 staging buffers (at::vec conversions, round to nearest even on the way back).
// The backward is this op applied to the gradient with the same seed and p: the mask is regenerated.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "dropout.h"

namespace fastllm {
namespace {

constexpr int64_t kTile = 1024;    // 8 KiB of fp32 staging (bf16/fp16): stays in L1
constexpr int64_t kGrain = 32768;  // elements per task at least: amortizes the task overhead
constexpr int64_t kSpan = int64_t{1} << 32;

// v when keep, else +0: a bitwise AND, so that the loop below has no branch to stop vectorization.
template <typename A>
inline A keep_or_zero(A v, bool keep) {
  using U = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  U u;
  std::memcpy(&u, &v, sizeof u);
  u &= U(0) - U(keep);
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// y[k] = keep(element lo + k) ? x[k] * scale : +0 for one tile of the 2^32-span whose row key is rk.
template <typename A>
void dropout_tile(const A* __restrict x, A* __restrict y, uint32_t rk, uint32_t lo, uint32_t thr, A scale,
                  int64_t len) {
  for (int64_t k = 0; k < len; ++k) {
    const uint32_t h = elem_hash(rk, lo + static_cast<uint32_t>(k));
    y[k] = keep_or_zero(x[k] * scale, (h >> 8) >= thr);
  }
}

// src (bf16/fp16) -> fp32 with at::vec (at::vec::convert has no vectorized fp16 -> fp32 overload).
template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  using VecT = at::vec::Vectorized<T>;
  using VecF = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + VecT::size() <= n; i += VecT::size()) {
    auto [a, b] = at::vec::convert_to_float<T>(VecT::loadu(src + i));
    a.store(dst + i);
    b.store(dst + i + VecF::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void dropout_range(const T* x, T* y, const DropoutArgs& a, int64_t begin, int64_t end) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const A scale = static_cast<A>(a.scale);
  alignas(64) float xf[kTile], yf[kTile];
  for (int64_t i = begin; i < end;) {
    const int64_t len = std::min({kTile, end - i, kSpan - (i & (kSpan - 1))});
    const uint32_t rk = row_key(a.key, static_cast<uint32_t>(i >> 32)), lo = static_cast<uint32_t>(i);
    if constexpr (std::is_same_v<T, A>) {
      dropout_tile<A>(x + i, y + i, rk, lo, a.thr, scale, len);
    } else {  // bf16 / fp16 through fp32
      to_float(x + i, xf, len);
      dropout_tile<float>(xf, yf, rk, lo, a.thr, scale, len);
      at::vec::convert(yf, y + i, len);
    }
    i += len;
  }
}

at::Tensor dropout_fwd_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  const DropoutArgs a = check_dropout(x, p, seed);
  auto y = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { dropout_range<scalar_t>(xp, yp, a, b, e); });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("dropout_fwd", &dropout_fwd_cpu); }

}  // namespace fastllm
