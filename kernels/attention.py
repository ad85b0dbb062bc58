"""Triton FlashAttention-2: forward, and a backward in two kernels (dK/dV, then dQ), as torch.library.triton_op.

Invariants:
- Same contract and layouts as the C++ ops fastllm::attention_fwd/_bwd (csrc/attention/attention.h): padded
  (B, H, T, D) or varlen (total, H, D) with int32 cu_seqlens; returns (out, lse) and (dq, dk, dv); lse is fp32.
- Forward: one program per (block of BLOCK_M query rows, b*H + h); loops over key blocks with an online softmax
  in fp32; a row with no allowed key gets out = 0 and lse = +inf. The dropout mask is the counter hash of
  fastllm.ops.reference.dropout_keep (murmur3 fmix32 chain over (seed, b*H + h, row, col)), regenerated in the
  backward, never stored.
- Backward: delta = rowsum(dO * O) in torch (O(B*H*T)); kernel 1, one program per (key block, b*Hkv + kv head),
  owns dK/dV and loops over the query heads of its group (GQA) and the query blocks; kernel 2, one program per
  (query block, b*H + h), owns dQ. No atomics: deterministic.
- fp32 inputs use IEEE fp32 dots (no TF32); on CPU (TRITON_INTERPRET=1, tests) every dot is upcast to fp32,
  since the interpreter's bf16 tl.dot is wrong. Runs on CUDA tensors, and on CPU tensors in the interpreter.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastllm.ops.reference import HASH_BH, HASH_COL, HASH_ROW, dropout_threshold

from .dropout import fmix32 as _fmix32  # the counter hash, shared with the dropout op


@triton.jit
def _keep(seed_lo, seed_hi, bh, rows, cols, thr, C_BH: tl.constexpr, C_ROW: tl.constexpr, C_COL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool keep mask for query rows x key cols of head bh (uint32 arithmetic)."""
    hk = _fmix32(seed_lo ^ _fmix32(seed_hi ^ (bh.to(tl.uint32) * C_BH)))
    rk = _fmix32(hk ^ (rows.to(tl.uint32) * C_ROW))
    h = _fmix32(rk[:, None] ^ (cols.to(tl.uint32) * C_COL)[None, :])
    return (h >> 8) >= thr


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _head(CU, b, h, nh, T, D, VARLEN: tl.constexpr):
    """(offset of row 0, row stride, first packed row, length) of head h (of nh) of sequence b."""
    if VARLEN:
        s = tl.load(CU + b)
        return (s.to(tl.int64) * nh + h) * D, nh * D, s, tl.load(CU + b + 1) - s
    return (b * nh + h).to(tl.int64) * T * D, D, b * T, T


@triton.jit
def _allowed(rows, cols, lq, lk, MASK, b, Tk, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    ok = (rows < lq)[:, None] & (cols < lk)[None, :]
    if HAS_MASK:
        ok &= (tl.load(MASK + b * Tk + cols, mask=cols < lk, other=0) != 0)[None, :]
    if CAUSAL:
        ok &= cols[None, :] <= rows[:, None] + (lk - lq)
    return ok


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, MASK, CUQ, CUK, H, G, Tq, Tk, D, total_q, scale, seed_lo, seed_hi, thr, drop_inv,
              VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              F32: tl.constexpr, C_BH: tl.constexpr, C_ROW: tl.constexpr, C_COL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base, q_rs, q0, lq = _head(CUQ, b, h, H, Tq, D, VARLEN)
    k_base, k_rs, k0, lk = _head(CUK, b, h // G, H // G, Tk, D, VARLEN)
    lse_base = h * total_q + q0 if VARLEN else bh.to(tl.int64) * Tq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    qmask = (rows < lq)[:, None] & (dcol < D)[None, :]
    q = tl.load(Q + q_base + rows[:, None].to(tl.int64) * q_rs + dcol[None, :], mask=qmask, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    kend = tl.minimum(lk, pid_m * BLOCK_M + BLOCK_M + lk - lq) if CAUSAL else lk
    for j0 in range(0, kend, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        kvm = (cols < lk)[:, None] & (dcol < D)[None, :]
        kv_off = k_base + cols[:, None].to(tl.int64) * k_rs + dcol[None, :]
        k = tl.load(K + kv_off, mask=kvm, other=0.0)
        s = _dot(q, tl.trans(k), F32) * scale
        s = tl.where(_allowed(rows, cols, lq, lk, MASK, b, Tk, HAS_MASK, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        corr = tl.exp(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed_lo, seed_hi, bh, rows, cols, thr, C_BH, C_ROW, C_COL), p * drop_inv, 0.0)
        v = tl.load(V + kv_off, mask=kvm, other=0.0)
        acc = acc * corr[:, None] + _dot(p.to(v.dtype), v, F32)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(O + q_base + rows[:, None].to(tl.int64) * q_rs + dcol[None, :], out.to(O.dtype.element_ty),
             mask=qmask)
    tl.store(LSE + lse_base + rows, lse, mask=rows < lq)


@triton.jit
def _p_tile(q, k, lse, rows, cols, lq, lk, MASK, b, Tk, scale, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
            F32: tl.constexpr):
    """P = exp(scale q k^T - lse), 0 where not allowed (and for rows with lse = +inf)."""
    s = _dot(q, tl.trans(k), F32) * scale
    s = tl.where(_allowed(rows, cols, lq, lk, MASK, b, Tk, HAS_MASK, CAUSAL), s, float("-inf"))
    return tl.exp(s - lse[:, None])


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, MASK, CUQ, CUK, H, G, Tq, Tk, D, total_q, scale,
                   seed_lo, seed_hi, thr, drop_inv,
                   VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   F32: tl.constexpr, C_BH: tl.constexpr, C_ROW: tl.constexpr, C_COL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, bhk = tl.program_id(0), tl.program_id(1)
    nkv = H // G
    b, hkv = bhk // nkv, bhk % nkv
    k_base, k_rs, k0, lk = _head(CUK, b, hkv, nkv, Tk, D, VARLEN)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    kvm = (cols < lk)[:, None] & (dcol < D)[None, :]
    kv_off = k_base + cols[:, None].to(tl.int64) * k_rs + dcol[None, :]
    k = tl.load(K + kv_off, mask=kvm, other=0.0)
    v = tl.load(V + kv_off, mask=kvm, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g in range(0, G):
        h = hkv * G + g
        q_base, q_rs, q0, lq = _head(CUQ, b, h, H, Tq, D, VARLEN)
        start = (tl.maximum(0, pid_n * BLOCK_N - (lk - lq)) // BLOCK_M) * BLOCK_M if CAUSAL else 0
        lse_base = h * total_q + q0 if VARLEN else (b * H + h).to(tl.int64) * Tq
        for i0 in range(start, lq, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            qm = (rows < lq)[:, None] & (dcol < D)[None, :]
            q_off = q_base + rows[:, None].to(tl.int64) * q_rs + dcol[None, :]
            q = tl.load(Q + q_off, mask=qm, other=0.0)
            do = tl.load(DO + q_off, mask=qm, other=0.0)
            lse = tl.load(LSE + lse_base + rows, mask=rows < lq, other=float("inf"))
            delta = tl.load(DELTA + lse_base + rows, mask=rows < lq, other=0.0)
            p = _p_tile(q, k, lse, rows, cols, lq, lk, MASK, b, Tk, scale, HAS_MASK, CAUSAL, F32)
            dp = _dot(do, tl.trans(v), F32)
            pd = p
            if DROPOUT:
                keep = _keep(seed_lo, seed_hi, b * H + h, rows, cols, thr, C_BH, C_ROW, C_COL)
                pd = tl.where(keep, p * drop_inv, 0.0)
                dp = tl.where(keep, dp * drop_inv, 0.0)
            dv += _dot(tl.trans(pd.to(do.dtype)), do, F32)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, F32)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kvm)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kvm)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, MASK, CUQ, CUK, H, G, Tq, Tk, D, total_q, scale,
                 seed_lo, seed_hi, thr, drop_inv,
                 VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 F32: tl.constexpr, C_BH: tl.constexpr, C_ROW: tl.constexpr, C_COL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base, q_rs, q0, lq = _head(CUQ, b, h, H, Tq, D, VARLEN)
    k_base, k_rs, k0, lk = _head(CUK, b, h // G, H // G, Tk, D, VARLEN)
    lse_base = h * total_q + q0 if VARLEN else bh.to(tl.int64) * Tq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    qm = (rows < lq)[:, None] & (dcol < D)[None, :]
    q_off = q_base + rows[:, None].to(tl.int64) * q_rs + dcol[None, :]
    q = tl.load(Q + q_off, mask=qm, other=0.0)
    do = tl.load(DO + q_off, mask=qm, other=0.0)
    lse = tl.load(LSE + lse_base + rows, mask=rows < lq, other=float("inf"))
    delta = tl.load(DELTA + lse_base + rows, mask=rows < lq, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    kend = tl.minimum(lk, pid_m * BLOCK_M + BLOCK_M + lk - lq) if CAUSAL else lk
    for j0 in range(0, kend, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        kvm = (cols < lk)[:, None] & (dcol < D)[None, :]
        kv_off = k_base + cols[:, None].to(tl.int64) * k_rs + dcol[None, :]
        k = tl.load(K + kv_off, mask=kvm, other=0.0)
        v = tl.load(V + kv_off, mask=kvm, other=0.0)
        p = _p_tile(q, k, lse, rows, cols, lq, lk, MASK, b, Tk, scale, HAS_MASK, CAUSAL, F32)
        dp = _dot(do, tl.trans(v), F32)
        if DROPOUT:
            keep = _keep(seed_lo, seed_hi, bh, rows, cols, thr, C_BH, C_ROW, C_COL)
            dp = tl.where(keep, dp * drop_inv, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, F32)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=qm)


def _meta(q, k, mask, cu_q, max_q, max_k, causal, dropout_p, seed):
    """Launch arguments shared by the three kernels."""
    varlen = cu_q is not None
    h, hkv, d = (q.shape[1], k.shape[1], q.shape[-1])
    bsz = cu_q.numel() - 1 if varlen else q.shape[0]
    f32 = q.dtype == torch.float32 or not q.is_cuda
    block = 64 if q.is_cuda else 32  # small tiles keep the interpreter's numpy work per program small
    args = dict(H=h, G=h // hkv, Tq=max_q, Tk=max_k, D=d, total_q=q.shape[0] if varlen else bsz * max_q,
                seed_lo=seed & 0xFFFFFFFF, seed_hi=(seed >> 32) & 0xFFFFFFFF, thr=dropout_threshold(dropout_p),
                drop_inv=1.0 / (1.0 - dropout_p))
    const = dict(VARLEN=varlen, HAS_MASK=mask is not None, CAUSAL=causal, DROPOUT=dropout_p > 0, F32=f32,
                 C_BH=HASH_BH, C_ROW=HASH_ROW, C_COL=HASH_COL, BLOCK_M=block, BLOCK_N=block,
                 BLOCK_D=max(16, triton.next_power_of_2(d)))
    return bsz, args, const


def _mask_u8(mask):
    return None if mask is None else mask.view(torch.uint8)


@triton_op("fastllm::attention_fwd_triton", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
         cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
         max_seqlen_k: int, causal: bool, dropout_p: float, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, args, const = _meta(q, k, key_padding_mask, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, dropout_p,
                             seed)
    out = torch.empty_like(q)
    lse = q.new_empty((args["H"], q.shape[0]) if cu_seqlens_q is not None else q.shape[:3], dtype=torch.float32)
    grid = (triton.cdiv(max(max_seqlen_q, 1), const["BLOCK_M"]), bsz * args["H"])
    wrap_triton(_attn_fwd)[grid](q, k, v, out, lse, _mask_u8(key_padding_mask), cu_seqlens_q, cu_seqlens_k,
                                 scale=scale, **args, **const)
    return out, lse


@triton_op("fastllm::attention_bwd_triton", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor, key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
         cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, causal: bool, dropout_p: float,
         scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, args, const = _meta(q, k, key_padding_mask, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, dropout_p,
                             seed)
    delta = (dout.float() * out.float()).sum(-1)  # (B, H, Tq) or (total_q, H)
    delta = delta.t().contiguous() if cu_seqlens_q is not None else delta  # the layout of lse
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask = _mask_u8(key_padding_mask)
    nkv = args["H"] // args["G"]
    grid_kv = (triton.cdiv(max(max_seqlen_k, 1), const["BLOCK_N"]), bsz * nkv)
    wrap_triton(_attn_bwd_dkdv)[grid_kv](q, k, v, dout, lse, delta, dk, dv, mask, cu_seqlens_q, cu_seqlens_k,
                                         scale=scale, **args, **const)
    grid_q = (triton.cdiv(max(max_seqlen_q, 1), const["BLOCK_M"]), bsz * args["H"])
    wrap_triton(_attn_bwd_dq)[grid_q](q, k, v, dout, lse, delta, dq, mask, cu_seqlens_q, cu_seqlens_k,
                                      scale=scale, **args, **const)
    return dq, dk, dv


@functools.cache
def attention_fwd_op():
    """The forward op, with its autograd formula registered (once)."""
    from fastllm.ops.attention import _bwd_fake, _fwd_fake, _make_backward, _setup_context

    # Explicit fake kernels: the derived ones would run the kernel body, which the CPU interpreter cannot fake.
    _fwd.register_fake(_fwd_fake)
    _bwd.register_fake(_bwd_fake)
    torch.library.register_autograd("fastllm::attention_fwd_triton", _make_backward(_bwd, strided=False),
                                    setup_context=_setup_context)
    return _fwd
