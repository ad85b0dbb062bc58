"""Pure-PyTorch reference implementations of every fastllm op: the test oracle and the last-resort fallback.

Invariants: written for readability, not speed; built only from differentiable torch primitives so that
autograd gives the gradients; computed in the input dtype (tests call them on float64 inputs to get the
oracle, and on the kernel's dtype to measure what plain PyTorch achieves).
"""
from __future__ import annotations

import math

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, residual: torch.Tensor | None = None):
    """LayerNorm over the last dim; with `residual`, returns (LN(x + residual), x + residual)."""
    h = x if residual is None else x + residual  # (..., N)
    mean = h.mean(dim=-1, keepdim=True)  # (..., 1)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)  # (..., 1), biased as in torch.nn.LayerNorm
    y = (h - mean) * torch.rsqrt(var + eps)  # (..., N)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y if residual is None else (y, h)


# ---------------------------------------------------------------------------------------------------------------
# Attention. The dropout mask comes from a counter-based hash of (seed, b*H + h, query row, key col), so every
# backend (C++, CUDA, Triton) draws the same mask for the same seed without storing it. All arithmetic is on
# uint32 values held in int64 tensors; products are split in 16-bit halves so that they never exceed 2^48.
# ---------------------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
HASH_BH, HASH_ROW, HASH_COL = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 a in [0, 2^32) and a 32-bit constant c."""
    return ((a * (c & 0xFFFF)) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection of [0, 2^32) with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """Keep an element when (hash >> 8) >= this: a uniform 24-bit draw compared with p * 2^24."""
    return int(math.floor(p * 16777216.0 + 0.5))


def dropout_keep(seed: int | torch.Tensor, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 p: float) -> torch.Tensor:
    """Boolean keep mask, broadcast over bh (..., 1, 1), rows (..., R, 1) and cols (..., 1, C).

    `seed` is an int, or a 0-d int64 tensor (drawn inside a torch.compile graph)."""
    a = _seed_key(seed, _mul32(bh.long(), HASH_BH))  # per (seed, b*H + h)
    return _keep(a, rows.long(), cols.long(), p)


def _seed_key(seed: int | torch.Tensor, salt) -> torch.Tensor:
    """fmix32(seed_lo ^ fmix32(seed_hi ^ salt)): the key every mask starts from (seed taken mod 2^64)."""
    lo, hi = torch.as_tensor(seed & _M32), torch.as_tensor((seed >> 32) & _M32)
    return _fmix32(lo ^ _fmix32(hi ^ salt))


def _keep(key: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """(fmix32(fmix32(key ^ row * HASH_ROW) ^ col * HASH_COL) >> 8) >= threshold(p), broadcast over the inputs."""
    r = _fmix32(key ^ _mul32(rows, HASH_ROW))  # per row
    h = _fmix32(r ^ _mul32(cols, HASH_COL))  # per element
    return (h >> 8) >= dropout_threshold(p)


# ---------------------------------------------------------------------------------------------------------------
# Standalone dropout. The mask of element n (flat row-major index into the contiguous x) is
#   key = fmix32(seed_lo ^ fmix32(seed_hi ^ HASH_DROPOUT))         seed taken mod 2^64, split in 32-bit halves
#   r   = fmix32(key ^ (n_hi * HASH_ROW) mod 2^32)                   n_hi = n >> 32 (0 below 2^32 elements)
#   h   = fmix32(r ^ (n_lo * HASH_COL) mod 2^32)                     n_lo = n mod 2^32
#   keep = (h >> 8) >= dropout_threshold(p)
# (attention's row/element chain with a per-seed key), and y = keep ? x * scale : +0 with scale = 1 / (1 - p)
# computed in float64 and rounded once to the compute dtype: float64 for float64 inputs, float32 for
# float32/bfloat16/float16 inputs (the product is rounded to the input dtype). The C++, CUDA and Triton
# kernels compute exactly this, so every backend gives the same bits for the same seed.
# ---------------------------------------------------------------------------------------------------------------
HASH_DROPOUT = 0x27D4EB2F


def dropout_mask(seed: int | torch.Tensor, numel: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask (numel,) of the standalone dropout op; `seed` is an int or a 0-d int64 tensor."""
    key = _seed_key(seed, HASH_DROPOUT).to(device)  # () per seed
    n = torch.arange(numel, dtype=torch.int64, device=device)  # (numel,)
    return _keep(key, n >> 32, n & _M32, p)  # (numel,): row n >> 32 (0 below 2^32 elements), col n mod 2^32


def dropout_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dropout multiplies in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout(x: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """keep ? x / (1 - p) : 0 elementwise, the mask from dropout_mask over the row-major flat index of x."""
    keep = dropout_mask(seed, x.numel(), p, x.device).view(x.shape)  # (*x.shape) bool
    ct = dropout_compute_dtype(x.dtype)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=ct, device=x.device)  # () rounded once to the compute dtype
    y = torch.where(keep, x.to(ct) * scale, torch.zeros((), dtype=ct, device=x.device))  # (*x.shape)
    return y.to(x.dtype)


def _masked_softmax(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of s where `allowed`; a row with nothing allowed is all zeros (not NaN)."""
    s = s.masked_fill(~allowed, float("-inf"))  # (B, H, Tq, Tk)
    m = s.amax(dim=-1, keepdim=True).detach()  # (B, H, Tq, 1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)  # (B, H, Tq, Tk), exactly 0 where masked
    l = e.sum(dim=-1, keepdim=True)  # (B, H, Tq, 1)
    return e / torch.where(l == 0, torch.ones_like(l), l)


def _allowed(b: int, tq: int, tk: int, causal: bool, key_padding_mask, device) -> torch.Tensor:
    """(B or 1, 1, Tq, Tk) bool: keys each query may attend (causal bottom-right aligned, offset Tk - Tq)."""
    allowed = torch.ones(1, 1, tq, tk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(tq, device=device)[:, None]
        j = torch.arange(tk, device=device)[None, :]
        allowed = allowed & (j <= i + (tk - tq))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()  # (B, 1, 1, Tk)
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
              seed: int | torch.Tensor = 0, batch_index: torch.Tensor | None = None) -> torch.Tensor:
    """Materialized-score attention. q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with Hkv dividing H.

    `batch_index` (B,) renames the batch entries for the dropout hash (varlen uses the sequence index)."""
    bsz, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(h // hkv, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(h // hkv, dim=1)  # (B, H, Tk, D)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    p = _masked_softmax(s, _allowed(bsz, tq, tk, causal, key_padding_mask, q.device))
    if dropout_p > 0:
        bi = torch.arange(bsz, device=q.device) if batch_index is None else batch_index.to(q.device)
        bh = (bi[:, None] * h + torch.arange(h, device=q.device))[:, :, None, None]  # (B, H, 1, 1)
        rows = torch.arange(tq, device=q.device)[:, None]
        cols = torch.arange(tk, device=q.device)[None, :]
        keep = dropout_keep(seed, bh, rows, cols, dropout_p)  # (B, H, Tq, Tk)
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return torch.matmul(p, v)  # (B, H, Tq, D)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, causal: bool = False, dropout_p: float = 0.0,
                     scale: float | None = None, seed: int = 0) -> torch.Tensor:
    """Packed attention: q (total_q, H, D), k and v (total_k, Hkv, D); sequence b is rows cu[b]:cu[b+1]."""
    outs = []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]  # (1, H, Lq, D)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]  # (1, Hkv, Lk, D)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]  # (1, Hkv, Lk, D)
        ob = attention(qb, kb, vb, causal, None, dropout_p, scale, seed, torch.tensor([b]))
        outs.append(ob[0].transpose(0, 1))  # (Lq, H, D)
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy of (N, V) logits against (N,) class labels, as torch.nn.functional.cross_entropy:
    loss_i = (1 - s) * (lse_i - x_i,y_i) + s * (lse_i - mean_j x_ij), 0 for rows labelled ignore_index;
    'mean' divides the sum by the number of non-ignored rows (0/0 = nan when all are ignored)."""
    keep = labels != ignore_index  # (N,)
    safe = torch.where(keep, labels, torch.zeros_like(labels))  # (N,)
    logp = torch.log_softmax(logits, dim=-1)  # (N, V)
    nll = -logp.gather(1, safe[:, None]).squeeze(1)  # (N,)
    smooth = -logp.mean(dim=-1)  # (N,)
    loss = torch.where(keep, (1.0 - label_smoothing) * nll + label_smoothing * smooth, 0.0)  # (N,)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, labels): the unfused oracle, materializing all (N, V) logits."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
    return cross_entropy(logits, labels, ignore_index, label_smoothing, reduction)
