"""MultiHeadAttention: self- or cross-attention on fastllm.ops.attention with fused projections and a KV cache.

Invariants:
- Self-attention projects q, k, v with one fused Linear `qkv` (H -> (heads + 2 kv_heads) * D, rows ordered
  [q; k; v], each head-major as HF's separate query/key/value weights concatenated); cross-attention has `q`
  (H -> H) and a fused `kv` (H -> 2 kv_heads * D) applied to the encoder memory. Output projection `out`.
- kv_heads divides heads (grouped-query attention). key_padding_mask (B, Tk) bool, True = attend; causal
  masking is bottom-right aligned, so with a cache of P positions a query at step i sees keys 0..P+i.
- past_key_value is an immutable (k, v) pair of (B, kv_heads, P, D) tensors; forward returns the new pair
  (old and new positions concatenated) when use_cache, else None. For cross-attention the pair is the
  projected memory, computed once and reused.
- Attention dropout is applied only in training mode, inside the fused op (no (T, T) mask is stored).
- output_attentions=True computes the probabilities with materialized scores (fastllm.ops.reference math,
  no dropout) and returns them (B, heads, Tq, Tk); it is for analysis, never the training path.
- The backend is chosen at build time (KernelChoice), never inside forward().
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastllm.nn._kernels import KernelChoice
from fastllm.ops import reference
from fastllm.ops.attention import attention


class MultiHeadAttention(KernelChoice):
    OPS = ("attention",)

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *, dropout: float = 0.0,
                 bias: bool = True, cross: bool = False, scale: float | None = None, rotary=None,
                 kernels: str = "auto"):
        super().__init__()
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads or num_heads % kv:
            raise ValueError(f"MultiHeadAttention: hidden_size {hidden_size} must divide into num_heads "
                             f"{num_heads}, and num_heads into num_kv_heads {kv}")
        self.heads, self.kv_heads, self.head_dim = num_heads, kv, hidden_size // num_heads
        self.dropout_p, self.cross, self.rotary = dropout, cross, rotary
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        kv_dim = 2 * kv * self.head_dim
        if cross:
            self.q = nn.Linear(hidden_size, hidden_size, bias=bias)
            self.kv = nn.Linear(hidden_size, kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(hidden_size, hidden_size + kv_dim, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)
        self._init_kernels(kernels)

    def _split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def _project(self, x, memory, past):
        kvd = self.kv_heads * self.head_dim
        if not self.cross:
            q, k, v = self.qkv(x).split([self.heads * self.head_dim, kvd, kvd], dim=-1)  # (B, T, *)
            return self._split(q, self.heads), self._split(k, self.kv_heads), self._split(v, self.kv_heads)
        q = self._split(self.q(x), self.heads)  # (B, H, Tq, D)
        if past is not None:
            return q, None, None  # cross keys/values come from the cache
        k, v = self.kv(memory).split([kvd, kvd], dim=-1)  # (B, Tk, kvd) each
        return q, self._split(k, self.kv_heads), self._split(v, self.kv_heads)

    def _with_past(self, k, v, past):
        if past is None:
            return k, v
        if self.cross:
            return past
        return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, Hkv, P + T, D)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None = None, key_padding_mask=None,
                causal: bool = False, past_key_value=None, use_cache: bool = False, positions=None,
                output_attentions: bool = False):
        """x (B, Tq, H) -> (out (B, Tq, H), present (k, v) or None, probabilities or None)."""
        if self.cross and memory is None and past_key_value is None:
            raise ValueError("MultiHeadAttention(cross=True) needs `memory` or a cached past_key_value")
        q, k, v = self._project(x, memory, past_key_value)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        k, v = self._with_past(k, v, past_key_value)
        probs = self._probs(q, k, causal, key_padding_mask) if output_attentions else None
        p = self.dropout_p if self.training else 0.0
        o = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=p, scale=self.scale,
                      backend=self.backend["attention"])  # (B, H, Tq, D)
        o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, Tq, H*D)
        return self.out(o), ((k, v) if use_cache else None), probs

    def _probs(self, q, k, causal, key_padding_mask) -> torch.Tensor:
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # (B, H, Tk, D)
        s = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale  # (B, H, Tq, Tk)
        allowed = reference._allowed(q.shape[0], q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
        return reference._masked_softmax(s, allowed).detach()  # (B, H, Tq, Tk)
