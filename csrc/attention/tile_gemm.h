// Register-tiled fp32 GEMM for the small, cache-resident tiles of the CPU attention kernel (AVX-512 only).
//
// C (M x N) = alpha * A B            (accumulate = false)
// C (M x N) = alpha * A B + C        (accumulate = true)
// with A(r, k) = a[r * a_rs + k * a_cs] (row-major A: a_cs = 1; A transposed in memory: a_rs = 1), B row k at
// b + k * b_rs holding N contiguous floats, C row r at c + r * c_rs. Nothing is packed: in the attention kernel's
// P V, Pd^T dO, dS K and dS^T Q products B is rows of V, dO, K or Q (D contiguous floats each), so the packing that
// a BLAS call does on every one of these ~1-MFLOP products (a fifth of the backward's time with MKL) is not needed.
//
// Micro-kernel: a 6 x 64 block of C in 24 zmm accumulators; per k, four loads of B, six broadcasts of A and 24
// FMAs (FMA-bound on two FMA ports). N is covered in 64-column panels (the last vector of a panel masked), M in
// 6-row blocks with a 1..5-row tail, K in passes of kDepth (C accumulates between passes). Summation over k is
// sequential in fp32 (one FMA per term), the same order for every element; the result is rounded once more by
// alpha (and once by the add when accumulating, also between K passes).
// Measured on one AVX-512 core (FMA peak ~200 GFLOP/s): 140-160 GFLOP/s on 128 x 128 x 64 / 128 x 64 x 128 tiles,
// against MKL's 112-118 through torch.mm for the same products.
#pragma once
#include <cstdint>

#ifdef __AVX512F__
#include <immintrin.h>

namespace fastllm {
namespace tile_gemm {

constexpr int kRows = 6;   // rows of C per micro-kernel
constexpr int kPanel = 64;  // columns of C per panel (four zmm)
constexpr int64_t kDepth = 128;  // k per pass: a B panel (128 x 64 fp32, 32 KiB) stays in the 48 KiB L1

template <int R, int NV>
inline void micro(int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs, float* c,
                  int64_t c_rs, float alpha, bool accumulate, __mmask16 last) {
  __m512 x[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * b_rs;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = v + 1 < NV ? _mm512_loadu_ps(bk + 16 * v) : _mm512_maskz_loadu_ps(last, bk + 16 * v);
    const float* ak = a + k * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) x[r][v] = _mm512_fmadd_ps(av, bv[v], x[r][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * c_rs + 16 * v;
      const __mmask16 m = v + 1 < NV ? static_cast<__mmask16>(0xFFFF) : last;
      __m512 y = _mm512_mul_ps(x[r][v], va);
      if (accumulate) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, cp));
      _mm512_mask_storeu_ps(cp, m, y);
    }
}

// All rows of one panel of NV vectors.
template <int NV>
inline void panel(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs,
                  float* c, int64_t c_rs, float alpha, bool acc, __mmask16 last) {
  int64_t r = 0;
  for (; r + kRows <= M; r += kRows)
    micro<kRows, NV>(K, a + r * a_rs, a_rs, a_cs, b, b_rs, c + r * c_rs, c_rs, alpha, acc, last);
  const float* ar = a + r * a_rs;
  float* cr = c + r * c_rs;
  switch (M - r) {
    case 1: return micro<1, NV>(K, ar, a_rs, a_cs, b, b_rs, cr, c_rs, alpha, acc, last);
    case 2: return micro<2, NV>(K, ar, a_rs, a_cs, b, b_rs, cr, c_rs, alpha, acc, last);
    case 3: return micro<3, NV>(K, ar, a_rs, a_cs, b, b_rs, cr, c_rs, alpha, acc, last);
    case 4: return micro<4, NV>(K, ar, a_rs, a_cs, b, b_rs, cr, c_rs, alpha, acc, last);
    case 5: return micro<5, NV>(K, ar, a_rs, a_cs, b, b_rs, cr, c_rs, alpha, acc, last);
    default: return;
  }
}

inline void gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t a_rs, int64_t a_cs,
                 const float* b, int64_t b_rs, bool accumulate, float* c, int64_t c_rs) {
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kDepth) {  // K = 0 still writes C = 0 (or leaves C)
    const int64_t kk = K - k0 < kDepth ? K - k0 : kDepth;
    const bool acc = accumulate || k0 > 0;
    for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
      const int64_t nn = N - n0 < kPanel ? N - n0 : kPanel;
      const int nv = static_cast<int>((nn + 15) / 16);
      const int tail = static_cast<int>(nn - 16 * (nv - 1));  // 1..16 columns in the last vector
      const __mmask16 last = static_cast<__mmask16>(tail == 16 ? 0xFFFF : (1u << tail) - 1);
      const float* ap = a + k0 * a_cs;
      const float* bp = b + k0 * b_rs + n0;
      float* cp = c + n0;
      switch (nv) {
        case 1: panel<1>(M, kk, ap, a_rs, a_cs, bp, b_rs, cp, c_rs, alpha, acc, last); break;
        case 2: panel<2>(M, kk, ap, a_rs, a_cs, bp, b_rs, cp, c_rs, alpha, acc, last); break;
        case 3: panel<3>(M, kk, ap, a_rs, a_cs, bp, b_rs, cp, c_rs, alpha, acc, last); break;
        default: panel<4>(M, kk, ap, a_rs, a_cs, bp, b_rs, cp, c_rs, alpha, acc, last); break;
      }
    }
  }
}

}  // namespace tile_gemm
}  // namespace fastllm

#endif  // __AVX512F__
