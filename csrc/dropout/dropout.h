// The counter-based dropout hash shared by every fastllm kernel that drops elements (attention's probabilities,
// the standalone dropout op), CPU and CUDA, plus the argument checks of fastllm::dropout_fwd.
//
// Invariants:
// - Every mask is a pure function of (seed, element coordinates, p): the same bits as
//   fastllm.ops.reference.dropout_keep / dropout_mask and the Triton kernels, so every backend draws the same
//   mask for the same seed and a backward regenerates it instead of storing it.
// - An element is kept when (hash >> 8) >= dropout_threshold(p): a uniform 24-bit draw against p * 2^24.
// - fastllm::dropout_fwd: key = fmix32(seed_lo ^ fmix32(seed_hi ^ kHashDropout)); flat index n (row-major over
//   the contiguous x) gives hash = elem_hash(row_key(key, n >> 32), n mod 2^32).
// - All arithmetic is uint32 with wrapping multiplies and logical shifts.
#pragma once
#include <cmath>
#include <cstdint>

#include "../checks.h"

#if defined(__CUDACC__)
#define FASTLLM_HD __host__ __device__ __forceinline__
#else
#define FASTLLM_HD inline
#endif

namespace fastllm {

constexpr uint32_t kHashBH = 0x9E3779B1u, kHashRow = 0x85EBCA77u, kHashCol = 0xC2B2AE3Du;
constexpr uint32_t kHashDropout = 0x27D4EB2Fu;  // the standalone op's key domain (xxHash's PRIME32_3)

// MurmurHash3's 32-bit finalizer: a bijection of [0, 2^32) with full avalanche.
FASTLLM_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// The key every mask starts from: fmix32(seed_lo ^ fmix32(seed_hi ^ salt)).
FASTLLM_HD uint32_t seed_key(uint64_t seed, uint32_t salt) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  return fmix32(lo ^ fmix32(hi ^ salt));
}

// Attention: per (seed, b*H + h) key; then per query row; then per element (key col).
FASTLLM_HD uint32_t head_key(uint64_t seed, uint32_t bh) { return seed_key(seed, bh * kHashBH); }
FASTLLM_HD uint32_t row_key(uint32_t hk, uint32_t row) { return fmix32(hk ^ (row * kHashRow)); }
FASTLLM_HD uint32_t elem_hash(uint32_t rk, uint32_t col) { return fmix32(rk ^ (col * kHashCol)); }

// The standalone op: one key per seed; element n hashes (n >> 32) as the "row" and n mod 2^32 as the "col".
FASTLLM_HD uint32_t dropout_key(uint64_t seed) { return seed_key(seed, kHashDropout); }

inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::floor(p * 16777216.0 + 0.5)); }

// What a dropout kernel needs: the key, the threshold and the scale 1 / (1 - p) (computed in double; float
// kernels round it to fp32 once, as the reference and Triton do).
struct DropoutArgs {
  uint32_t key, thr;
  double scale;
};

// Validates fastllm::dropout_fwd's arguments and reads the seed (a 0-d int64 CPU tensor: no device sync).
inline DropoutArgs check_dropout(const at::Tensor& x, double p, const at::Tensor& seed) {
  const auto dt = x.scalar_type();
  FASTLLM_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "x must be float32, float64, bfloat16 or float16, got ", dt);
  CHECK_CONTIGUOUS(x);
  FASTLLM_CHECK(p >= 0 && p < 1, "p must be in [0, 1), got ", p);
  FASTLLM_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
                "seed must be a one-element int64 tensor, got ", seed.scalar_type(), " of shape ", seed.sizes());
  FASTLLM_CHECK(seed.is_cpu(), "seed must be a CPU tensor (read on the host), got one on ", seed.device());
  const auto s = static_cast<uint64_t>(seed.item<int64_t>());
  return {dropout_key(s), dropout_threshold(p), 1.0 / (1.0 - p)};
}

}  // namespace fastllm
