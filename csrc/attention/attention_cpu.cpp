// Fused attention (FlashAttention-2 tiling) for CPU.
//
// dtypes: float32 and bfloat16/float16 (converted to fp32 copies first: every GEMM, softmax and gradient sum is
//   fp32; extra memory stays linear in T). Layouts, masks and the dropout hash: see attention.h.
// Strides: every tensor has its own batch/head/row strides (Lay; the head dim contiguous), so q, k, v may be
//   views of one QKV projection; out, dq, dk, dv are allocated like their inputs (empty_heads).
// GEMMs: Q K^T and dO V^T (depth D) call torch's BLAS sgemm (mm_bt). The products whose B operand has row-
//   contiguous rows, P V, Pd^T dO, dS K and dS^T Q (depth: the tile's keys or rows), run on the register-tiled
//   AVX-512 kernel of tile_gemm.h in AVX-512 builds (no operand packing; BLAS elsewhere), see mm. Score tiles have
//   a row stride of an odd number of cache lines (odd_lines).
// Forward: tasks (sequence b, head h, block of query rows), dynamically scheduled over at::parallel_for's
//   threads (parallel_tasks); block sizes from fwd_blocks. Per k-block of keys:
//   S = scale * Q K^T, causal (bottom-right, offset lk - lq) and key-padding
//   masks to -inf (the padding mask as an added 0 / -inf bias row), online softmax (running max m, sum l,
//   at::vec exp), dropout scaling of P from the counter hash, acc += P V. Out = acc / l; lse = m + log l is
//   saved (fp32, (B, H, Tq) / (H, total_q)).
//   A row with no allowed key gets out = 0 and lse = +inf (so the backward recomputes P = 0, never NaN).
// Backward: tasks (b, kv head), dynamically scheduled; the task owns dK/dV of its kv head and dQ of the query heads
//   that share it (GQA), so there are no atomics. Per k-block (outer) and q-block of kBMB rows (inner): recompute
//   P = exp(S - lse), dV += Pd^T dO, dP = (dO V^T) o M, dS = P o (dP - rowsum(dO o O)), dQ += scale dS K,
//   dK += scale dS^T Q, where Pd = P o M and M is the dropout mask scaled by 1 / (1 - p). Causal: q-blocks that
//   end before the k-block are skipped.
// Dropout mask: the counter hash of attention.h, eight columns per AVX2 step (same bits as the scalar hash).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <dlfcn.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <atomic>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "attention.h"
#include "tile_gemm.h"

namespace fastllm {
namespace {

using Vec = at::vec::Vectorized<float>;

// A row stride (floats) of at least n that is an odd number of 64-byte lines. Score tiles walked down a column
// (P^T and dS^T in the dV/dK products) then spread over every L1 set; with a power-of-two stride (512 keys:
// 2 KiB) their rows fall into a few 12-way sets.
constexpr int64_t odd_lines(int64_t n) {
  const int64_t lines = (n + 15) / 16;
  return 16 * (lines % 2 ? lines : lines + 1);
}

constexpr int64_t kBM = 64, kBN = 128;  // smallest forward block (rows, keys); kBN: keys per backward block
constexpr int64_t kBMB = 128;           // query rows per block in the backward
constexpr int64_t kLdB = odd_lines(kBN);  // row stride of the backward's score tiles
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The BLAS sgemm_ that libtorch_cpu exports (MKL in the x86 wheels). at::native::cpublas::gemm is not exported,
// so it is looked up once at run time, in torch's own library; without it, mm() falls back to at::addmm.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

SgemmFn find_sgemm() {
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info)) return nullptr;
  void* lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
  return lib ? reinterpret_cast<SgemmFn>(dlsym(lib, "sgemm_")) : nullptr;
}

const SgemmFn kSgemm = find_sgemm();

at::Tensor view(const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
  auto x = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::kFloat);
  return t ? x.t() : x;
}

// Row-major C (m x n) = alpha * op(A) op(B) (+ C when acc), via the column-major BLAS GEMM
// (C^T = op(B)^T op(A)^T); op(A) is m x k, op(B) k x n, ta / tb: the operand is stored transposed.
void blas_mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, bool acc, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const float beta = acc ? 1.f : 0.f;
  if (kSgemm) {
    const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
    const int M = n, N = m, K = k, LA = ldb, LB = lda, LC = ldc;
    kSgemm(&tra, &trb, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
    return;
  }
  const at::Tensor x = ta ? view(a, k, m, lda, true) : view(a, m, k, lda, false);
  const at::Tensor y = tb ? view(b, n, k, ldb, true) : view(b, k, n, ldb, false);
  view(c, m, n, ldc, false).addmm_(x, y, beta, alpha);
}

// C (m x n) = alpha * op(A) B (+ C when acc) with B's rows contiguous: the P V, Pd^T dO, dS K and dS^T Q products.
// AVX-512 builds use the register-tiled kernel of tile_gemm.h (no operand packing), others BLAS. Measured on
// 2 AVX-512 cores, fp32 fwd+bwd, the tile kernel against BLAS for these products: 1.03-1.19x at D = 24, 32, 64
// and T = 128-2048, parity at D = 128.
void mm(bool ta, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
        int64_t ldb, bool acc, float* c, int64_t ldc) {
#ifdef __AVX512F__
  if (m > 0 && n > 0) tile_gemm::gemm(m, n, k, alpha, a, ta ? 1 : lda, ta ? lda : 1, b, ldb, acc, c, ldc);
#else
  blas_mm(ta, false, m, n, k, alpha, a, lda, b, ldb, acc, c, ldc);
#endif
}

// C (m x n) = alpha * A B^T (+ C when acc), B stored (n x k): the Q K^T and dO V^T products (BLAS).
void mm_bt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
           bool acc, float* c, int64_t ldc) {
  blas_mm(false, true, m, n, k, alpha, a, lda, b, ldb, acc, c, ldc);
}

// Runs body(state, t) for t in [0, n) on at::parallel_for's threads, each thread taking the next task from a
// shared counter (dynamic scheduling: tasks of unequal cost, e.g. causal blocks or varlen sequences, and a
// core shared with another process, do not leave one thread idle while the other works through its static half).
template <class Init, class Body>
void parallel_tasks(int64_t n, const Init& init, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    auto st = init();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(st, t);
  });
}

// Element strides of the batch, head and row dims of a (B, H, T, D) tensor, or (0, head, row) of a varlen
// (total, H, D) one; D is contiguous. q, k, v, out, dout and the gradients each have their own, so q, k and v can
// be views of one (B, T, 3 * H * D) projection and out / dq / dk / dv be allocated (B, T, H, D) (see empty_heads).
struct Lay {
  int64_t b, h, t;
};

Lay lay(const at::Tensor& x, bool varlen) {
  return varlen ? Lay{0, x.stride(1), x.stride(0)} : Lay{x.stride(0), x.stride(1), x.stride(2)};
}

struct Params {
  AttnDims d;
  Lay lq, lk, lv, lo, lg, ldq, ldk, ldv;  // layouts of q, k, v, out, dout, dq, dk, dv
  const float *q, *k, *v, *o, *dout;
  const float* kbias;  // key-padding mask as 0 / -inf, (B, Tk), or null
  int64_t fbm, fbn;    // forward block: query rows per task, keys per tile
  const int32_t *cu_q, *cu_k;
  float *out, *lse, *dq, *dk, *dv;
  bool causal;
  float scale, drop_p, drop_inv;
  uint32_t drop_thr;
  uint64_t seed;
};

// One (sequence b, query head h): its kv head, first rows (varlen) and lengths, and where its lse starts.
struct Head {
  int64_t b, h, hk, q0, k0, lq, lk, lse;
};

Head head(const Params& p, int64_t b, int64_t h) {
  const HeadView v = head_view(p.d, p.cu_q, p.cu_k, b, h);
  const int64_t q0 = p.cu_q ? p.cu_q[b] : 0, k0 = p.cu_k ? p.cu_k[b] : 0;
  return Head{b, h, h / (p.d.H / p.d.Hkv), q0, k0, v.lq, v.lk, v.lse};
}

// Element offset of query row i of head s in a tensor of layout l, and of key row j.
int64_t qrow(const Lay& l, const Head& s, int64_t i) { return s.b * l.b + s.h * l.h + (s.q0 + i) * l.t; }
int64_t krow(const Lay& l, const Head& s, int64_t j) { return s.b * l.b + s.hk * l.h + (s.k0 + j) * l.t; }

// Per-tile context: which rows/keys, and the causal offset of this sequence.
struct Tile {
  int64_t i0, bm, j0, bn, off, ld;  // ld: row stride of the tile's score buffers
};

// Sets disallowed scores of an (bm x bn) tile (row stride t.ld) to -inf. kbias: the sequence's key-padding
// mask as 0 / -inf (added, vectorized), or null.
void mask_tile(const Params& p, const Tile& t, const float* kbias, float* s) {
  const bool need_causal = p.causal && t.j0 + t.bn - 1 > t.i0 + t.off;
  for (int64_t r = 0; r < t.bm; ++r) {
    float* row = s + r * t.ld;
    if (kbias) at::vec::map2([](Vec a, Vec b) { return a + b; }, row, row, kbias + t.j0, t.bn);
    if (need_causal) {
      const int64_t first_bad = std::max<int64_t>(0, t.i0 + r + t.off + 1 - t.j0);
      for (int64_t c = first_bad; c < t.bn; ++c) row[c] = kNegInf;
    }
  }
}

// True when every key of [j0, j0 + bn) is padding.
bool block_all_masked(const float* kbias, int64_t j0, int64_t bn) {
  if (!kbias) return false;
  for (int64_t c = 0; c < bn; ++c)
    if (kbias[j0 + c] == 0.f) return false;
  return true;
}

#ifdef __AVX2__
// fmix32 of eight uint32 lanes (wrapping multiplies, logical shifts): the same bits as the scalar fmix32.
inline __m256i fmix32_v(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}
#endif

// m[c] = keep ? 1/(1-p) : 0 for the (bm x bn) tile of head key hk (row stride t.ld). Bit-identical to
// elem_hash in attention.h; with AVX2, eight columns at a time (col * kHashCol advanced by 8 * kHashCol).
void dropout_tile(const Params& p, const Tile& t, uint32_t hk, float* m) {
  for (int64_t r = 0; r < t.bm; ++r) {
    const uint32_t rk = row_key(hk, static_cast<uint32_t>(t.i0 + r));
    float* row = m + r * t.ld;
    int64_t c = 0;
#ifdef __AVX2__
    // (h >> 8) < 2^24 and drop_thr <= 2^24, so the signed compare is exact.
    const __m256i vrk = _mm256_set1_epi32(static_cast<int32_t>(rk));
    const __m256i vthr = _mm256_set1_epi32(static_cast<int32_t>(p.drop_thr));
    const __m256i step = _mm256_set1_epi32(static_cast<int32_t>(8u * kHashCol));
    const __m256 vinv = _mm256_set1_ps(p.drop_inv);
    const uint32_t k0 = static_cast<uint32_t>(t.j0) * kHashCol;
    __m256i col = _mm256_add_epi32(
        _mm256_set1_epi32(static_cast<int32_t>(k0)),
        _mm256_setr_epi32(0, static_cast<int32_t>(kHashCol), static_cast<int32_t>(2u * kHashCol),
                          static_cast<int32_t>(3u * kHashCol), static_cast<int32_t>(4u * kHashCol),
                          static_cast<int32_t>(5u * kHashCol), static_cast<int32_t>(6u * kHashCol),
                          static_cast<int32_t>(7u * kHashCol)));
    for (; c + 8 <= t.bn; c += 8, col = _mm256_add_epi32(col, step)) {
      const __m256i h = _mm256_srli_epi32(fmix32_v(_mm256_xor_si256(vrk, col)), 8);
      const __m256i drop = _mm256_cmpgt_epi32(vthr, h);  // h < thr
      _mm256_storeu_ps(row + c, _mm256_andnot_ps(_mm256_castsi256_ps(drop), vinv));
    }
#endif
    for (; c < t.bn; ++c) {
      const uint32_t h = elem_hash(rk, static_cast<uint32_t>(t.j0 + c));
      row[c] = (h >> 8) >= p.drop_thr ? p.drop_inv : 0.f;
    }
  }
}

float row_max(const float* s, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
}

// s = exp(s - mx) in place; returns the row sum (one pass over the row).
float exp_row(float* s, float mx, int64_t n) {
  const Vec vm(mx);
  Vec sum(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec e = (Vec::loadu(s + c) - vm).exp_u20();
    e.store(s + c);
    sum = sum + e;
  }
  if (c < n) {
    const int rest = static_cast<int>(n - c);
    const Vec e = (Vec::loadu(s + c, rest) - vm).exp_u20();
    e.store(s + c, rest);
    sum = sum + Vec::set(Vec(0.f), e, rest);
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
}

void scale_row(float* x, float a, int64_t n) {
  at::vec::map([a](Vec v) { return v * Vec(a); }, x, x, n);
}

struct FwdState {
  std::vector<float> s, m, acc, rmax, rsum;
  FwdState(int64_t d, int64_t bm, int64_t bn)
      : s(bm * odd_lines(bn)), m(bm * odd_lines(bn)), acc(bm * d), rmax(bm), rsum(bm) {}
};

// Online-softmax update of rows of the tile; leaves P (dropout applied) in st.s.
void softmax_update(const Params& p, const Tile& t, FwdState& st, uint32_t hk) {
  const int64_t D = p.d.D;
  for (int64_t r = 0; r < t.bm; ++r) {
    float* s = st.s.data() + r * t.ld;
    const float mnew = std::max(st.rmax[r], row_max(s, t.bn));
    if (mnew == kNegInf) {
      std::fill(s, s + t.bn, 0.f);
      continue;
    }
    const float corr = std::exp(st.rmax[r] - mnew);
    st.rsum[r] = st.rsum[r] * corr + exp_row(s, mnew, t.bn);
    st.rmax[r] = mnew;
    if (corr != 1.f) scale_row(st.acc.data() + r * D, corr, D);
  }
  if (p.drop_p > 0) {
    dropout_tile(p, t, hk, st.m.data());
    for (int64_t r = 0; r < t.bm; ++r)
      at::vec::map2([](Vec a, Vec b) { return a * b; }, st.s.data() + r * t.ld, st.s.data() + r * t.ld,
                    st.m.data() + r * t.ld, t.bn);
  }
}

void fwd_finish(const Params& p, const Head& hv, const Tile& t, FwdState& st) {
  const int64_t D = p.d.D;
  for (int64_t r = 0; r < t.bm; ++r) {
    float* o = p.out + qrow(p.lo, hv, t.i0 + r);
    const float l = st.rsum[r];
    if (l == 0.f) {
      std::fill(o, o + D, 0.f);
      p.lse[hv.lse + t.i0 + r] = std::numeric_limits<float>::infinity();
      continue;
    }
    at::vec::map([l](Vec x) { return x / Vec(l); }, o, st.acc.data() + r * D, D);
    p.lse[hv.lse + t.i0 + r] = st.rmax[r] + std::log(l);
  }
}

void fwd_block(const Params& p, FwdState& st, int64_t b, int64_t h, int64_t i0) {
  const Head hv = head(p, b, h);
  if (i0 >= hv.lq) return;
  const int64_t D = p.d.D, bm = std::min(p.fbm, hv.lq - i0), off = hv.lk - hv.lq, ld = odd_lines(p.fbn);
  const float* kbias = p.kbias ? p.kbias + b * p.d.Tk : nullptr;
  const uint32_t hk = head_key(p.seed, static_cast<uint32_t>(b * p.d.H + h));
  std::fill(st.acc.begin(), st.acc.end(), 0.f);
  std::fill(st.rmax.begin(), st.rmax.end(), kNegInf);
  std::fill(st.rsum.begin(), st.rsum.end(), 0.f);
  const int64_t kend = p.causal ? std::min(hv.lk, i0 + bm + off) : hv.lk;
  const float* q = p.q + qrow(p.lq, hv, i0);
  for (int64_t j0 = 0; j0 < kend; j0 += p.fbn) {
    const Tile t{i0, bm, j0, std::min(p.fbn, kend - j0), off, ld};
    if (block_all_masked(kbias, j0, t.bn)) continue;
    const float* k = p.k + krow(p.lk, hv, j0);
    mm_bt(bm, t.bn, D, p.scale, q, p.lq.t, k, p.lk.t, false, st.s.data(), ld);  // S (bm, bn)
    mask_tile(p, t, kbias, st.s.data());
    softmax_update(p, t, st, hk);
    mm(false, bm, D, t.bn, 1.f, st.s.data(), ld, p.v + krow(p.lv, hv, j0), p.lv.t, true, st.acc.data(),
       D);  // acc (bm, D) += P V
  }
  fwd_finish(p, hv, Tile{i0, bm, 0, 0, off, ld}, st);
}

at::Tensor as_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// An fp32 tensor of x's shape laid out as x: padded and row-major across heads (rows further apart than heads, as
// views of a (B, T, H * D) projection are) gives (B, T, H, D) memory seen as (B, H, T, D), so the caller's
// transpose(1, 2).flatten(2) is a view; otherwise contiguous. fastllm.ops.attention's fakes apply the same rule.
at::Tensor empty_heads(const at::Tensor& x, bool varlen, bool zero) {
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = !varlen && x.stride(2) > x.stride(1)
                       ? at::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, f32).transpose(1, 2)
                       : at::empty(x.sizes(), f32);
  return zero ? out.zero_() : out;
}

void set_layouts(Params& p, bool varlen, std::initializer_list<std::pair<Lay*, const at::Tensor*>> items) {
  for (const auto& [l, t] : items) *l = lay(*t, varlen);
}

// The key-padding mask as an additive 0 / -inf bias (B, Tk), or an undefined tensor without a mask.
at::Tensor key_bias(const std::optional<at::Tensor>& mask) {
  if (!mask) return {};
  return at::zeros(mask->sizes(), mask->options().dtype(at::kFloat)).masked_fill_(mask->logical_not(), kNegInf);
}

// Forward block sizes (query rows per task, keys per tile): as large as the sequence allows up to 256 x 512.
// Fewer, larger tiles mean fewer BLAS calls for S = Q K^T, each packing its operands once per tile. Measured on
// 2 AVX-512 cores, (2, 12, 2048, 64) fp32 forward: 132 ms at 64 x 128, 117 ms at 128 x 256, 108-111 ms at
// 256 x 512, 512 x 512 and 256 x 1024. There are B * H * ceil(Tq / bm) tasks; the S and P tiles (256 x 512 fp32,
// 512 KiB each) stay in L2.
std::pair<int64_t, int64_t> fwd_blocks(const AttnDims& d) {
  const int64_t bm = d.Tq >= 256 ? 256 : d.Tq >= 128 ? 128 : kBM;
  const int64_t bn = d.Tk >= 512 ? 512 : d.Tk >= 256 ? 256 : kBN;
  return {bm, bn};
}

Params make_params(const AttnDims& d, const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                   bool causal, double dropout_p, double scale, int64_t seed) {
  Params p{};
  p.d = d;
  p.cu_q = cu_q ? cu_q->data_ptr<int32_t>() : nullptr;
  p.cu_k = cu_k ? cu_k->data_ptr<int32_t>() : nullptr;
  p.causal = causal, p.scale = static_cast<float>(scale), p.drop_p = static_cast<float>(dropout_p);
  p.drop_inv = dropout_p > 0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.drop_thr = dropout_threshold(dropout_p), p.seed = static_cast<uint64_t>(seed);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
    bool causal, double dropout_p, double scale, int64_t seed) {
  const AttnDims d = check_attention(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, /*strided=*/true);
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v);
  at::Tensor out = empty_heads(q, d.varlen, false);
  at::Tensor lse = d.varlen ? at::empty({d.H, d.total_q}, out.options()) : at::empty({d.B, d.H, d.Tq}, out.options());
  Params p = make_params(d, cu_q, cu_k, causal, dropout_p, scale, seed);
  p.q = qf.data_ptr<float>(), p.k = kf.data_ptr<float>(), p.v = vf.data_ptr<float>();
  p.out = out.data_ptr<float>(), p.lse = lse.data_ptr<float>();
  set_layouts(p, d.varlen, {{&p.lq, &qf}, {&p.lk, &kf}, {&p.lv, &vf}, {&p.lo, &out}});
  const at::Tensor kbias = key_bias(mask);
  p.kbias = kbias.defined() ? kbias.data_ptr<float>() : nullptr;
  std::tie(p.fbm, p.fbn) = fwd_blocks(d);
  const int64_t nqb = (d.Tq + p.fbm - 1) / p.fbm;
  // Last (most expensive when causal) q-blocks of each head first, so the cheap ones fill the tail.
  parallel_tasks(d.B * d.H * nqb, [&] { return FwdState(d.D, p.fbm, p.fbn); }, [&](FwdState& st, int64_t t) {
    fwd_block(p, st, t / (d.H * nqb), (t / nqb) % d.H, (nqb - 1 - t % nqb) * p.fbm);
  });
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
struct BwdState {
  std::vector<float> s, m, dp, dkj, dvj, delta;  // delta: rowsum(dO o O) of the G query heads, (G, Tq)
  BwdState(int64_t d, int64_t rows)
      : s(kBMB * kLdB), m(kBMB * kLdB), dp(kBMB * kLdB), dkj(kBN * d), dvj(kBN * d), delta(rows) {}
};

// delta[i] = rowsum(dO_i * O_i) for the rows of one head.
void compute_delta(const Params& p, const Head& hv, float* delta) {
  for (int64_t i = 0; i < hv.lq; ++i) {
    const float* o = p.o + qrow(p.lo, hv, i);
    const float* g = p.dout + qrow(p.lg, hv, i);
    delta[i] = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                               [](Vec a, Vec b) { return a + b; }, o, g, p.d.D);
  }
}

// P = exp(S - lse) for a tile whose S (already masked) is in st.s.
void recompute_p(const Params& p, const Head& hv, const Tile& t, float* s) {
  for (int64_t r = 0; r < t.bm; ++r) {
    const float lse = p.lse[hv.lse + t.i0 + r];
    float* row = s + r * t.ld;
    if (lse == std::numeric_limits<float>::infinity()) {
      std::fill(row, row + t.bn, 0.f);
      continue;
    }
    at::vec::map([lse](Vec x) { return (x - Vec(lse)).exp_u20(); }, row, row, t.bn);
  }
}

// dS = P o (dP - delta) in place of dp.
void ds_tile(const Tile& t, const float* pm, float* dp, const float* delta) {
  for (int64_t r = 0; r < t.bm; ++r) {
    const Vec dl(delta[t.i0 + r]);
    const int64_t o = r * t.ld;
    at::vec::map2([dl](Vec pv, Vec g) { return pv * (g - dl); }, dp + o, pm + o, dp + o, t.bn);
  }
}

void bwd_tile(const Params& p, const Head& hv, const Tile& t, BwdState& st, uint32_t hk, const float* kbias,
              const float* delta) {
  const int64_t D = p.d.D;
  const float* q = p.q + qrow(p.lq, hv, t.i0);
  const float* g = p.dout + qrow(p.lg, hv, t.i0);
  const float* k = p.k + krow(p.lk, hv, t.j0);
  const float* v = p.v + krow(p.lv, hv, t.j0);
  float *s = st.s.data(), *dp = st.dp.data(), *m = st.m.data();
  mm_bt(t.bm, t.bn, D, p.scale, q, p.lq.t, k, p.lk.t, false, s, t.ld);  // S (bm, bn)
  mask_tile(p, t, kbias, s);
  recompute_p(p, hv, t, s);
  mm_bt(t.bm, t.bn, D, 1.f, g, p.lg.t, v, p.lv.t, false, dp, t.ld);  // dO V^T (bm, bn)
  if (p.drop_p > 0) {
    dropout_tile(p, t, hk, m);
    for (int64_t o = 0; o < t.bm * t.ld; o += t.ld) {
      at::vec::map2([](Vec a, Vec b) { return a * b; }, dp + o, dp + o, m + o, t.bn);
      at::vec::map2([](Vec a, Vec b) { return a * b; }, m + o, s + o, m + o, t.bn);  // Pd
    }
  }
  const float* pd = p.drop_p > 0 ? m : s;
  mm(true, t.bn, D, t.bm, 1.f, pd, t.ld, g, p.lg.t, true, st.dvj.data(), D);  // dV (bn, D) += Pd^T dO
  ds_tile(t, s, dp, delta);
  mm(false, t.bm, D, t.bn, p.scale, dp, t.ld, k, p.lk.t, true, p.dq + qrow(p.ldq, hv, t.i0), p.ldq.t);
  mm(true, t.bn, D, t.bm, p.scale, dp, t.ld, q, p.lq.t, true, st.dkj.data(), D);  // dK += dS^T Q
}

// All q-blocks of query head h against k-block [j0, j0 + bn).
void bwd_head_kblock(const Params& p, const Head& hv, BwdState& st, int64_t b, int64_t h, int64_t j0,
                     int64_t bn, const float* delta) {
  const int64_t off = hv.lk - hv.lq;
  const int64_t first = p.causal ? std::max<int64_t>(0, j0 - off) : 0;  // rows before it see none of the block
  const float* kbias = p.kbias ? p.kbias + b * p.d.Tk : nullptr;
  const uint32_t hk = head_key(p.seed, static_cast<uint32_t>(b * p.d.H + h));
  for (int64_t i0 = (first / kBMB) * kBMB; i0 < hv.lq; i0 += kBMB) {
    bwd_tile(p, hv, Tile{i0, std::min(kBMB, hv.lq - i0), j0, bn, off, kLdB}, st, hk, kbias, delta);
  }
}

void store_rows(const float* src, float* dst, int64_t rows, int64_t d, int64_t rs) {
  for (int64_t r = 0; r < rows; ++r) std::copy(src + r * d, src + (r + 1) * d, dst + r * rs);
}

void bwd_task(const Params& p, BwdState& st, int64_t b, int64_t hkv) {
  const int64_t G = p.d.H / p.d.Hkv, D = p.d.D, h0 = hkv * G;
  const Head kv = head(p, b, h0);
  const float* kbias = p.kbias ? p.kbias + b * p.d.Tk : nullptr;
  for (int64_t g = 0; g < G; ++g) compute_delta(p, head(p, b, h0 + g), st.delta.data() + g * p.d.Tq);
  for (int64_t j0 = 0; j0 < kv.lk; j0 += kBN) {
    const int64_t bn = std::min(kBN, kv.lk - j0);
    std::fill(st.dkj.begin(), st.dkj.end(), 0.f);
    std::fill(st.dvj.begin(), st.dvj.end(), 0.f);
    if (!block_all_masked(kbias, j0, bn)) {
      for (int64_t g = 0; g < G; ++g)
        bwd_head_kblock(p, head(p, b, h0 + g), st, b, h0 + g, j0, bn, st.delta.data() + g * p.d.Tq);
    }
    store_rows(st.dkj.data(), p.dk + krow(p.ldk, kv, j0), bn, D, p.ldk.t);
    store_rows(st.dvj.data(), p.dv + krow(p.ldv, kv, j0), bn, D, p.ldv.t);
  }
}

at::Tensor cast_back(const at::Tensor& t, const at::Tensor& like) {
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, bool causal, double dropout_p,
    double scale, int64_t seed) {
  const AttnDims d = check_attention(q, k, v, mask, cu_q, cu_k, max_q, max_k, dropout_p, /*strided=*/true);
  check_attention_bwd(d, q, dout, out, lse, /*strided=*/true);
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), of = as_f32(out), gf = as_f32(dout);
  at::Tensor dq = empty_heads(q, d.varlen, true), dk = empty_heads(k, d.varlen, false);
  at::Tensor dv = empty_heads(v, d.varlen, false);
  Params p = make_params(d, cu_q, cu_k, causal, dropout_p, scale, seed);
  p.q = qf.data_ptr<float>(), p.k = kf.data_ptr<float>(), p.v = vf.data_ptr<float>();
  p.o = of.data_ptr<float>(), p.dout = gf.data_ptr<float>(), p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr<float>(), p.dk = dk.data_ptr<float>(), p.dv = dv.data_ptr<float>();
  set_layouts(p, d.varlen, {{&p.lq, &qf}, {&p.lk, &kf}, {&p.lv, &vf}, {&p.lo, &of}, {&p.lg, &gf}, {&p.ldq, &dq},
                            {&p.ldk, &dk}, {&p.ldv, &dv}});
  const at::Tensor kbias = key_bias(mask);
  p.kbias = kbias.defined() ? kbias.data_ptr<float>() : nullptr;
  parallel_tasks(d.B * d.Hkv, [&] { return BwdState(d.D, (d.H / d.Hkv) * d.Tq); },
                 [&](BwdState& st, int64_t t) { bwd_task(p, st, t / d.Hkv, t % d.Hkv); });
  return {cast_back(dq, q), cast_back(dk, k), cast_back(dv, v)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastllm
