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
- query_rows (B, R) long (self-attention with a plain nn.Linear qkv only): queries, and so the output, only
  for those positions of x; keys and values still come from every position. The output is (B, R, H). Used by
  BERT's last layer in pre-training, whose loss reads only the masked positions and [CLS].
- output_attentions=True computes the probabilities with materialized scores (fastllm.ops.reference math,
  no dropout) and returns them (B, heads, Tq, Tk); it is for analysis, never the training path.
- The backend is chosen at build time (KernelChoice), never inside forward().
- The projections run through fastllm.nn.linear.linear: their weight gradients reuse a buffer across steps.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastllm.nn._kernels import KernelChoice
from fastllm.nn.linear import GradBuffer, linear, row_split_linear
from fastllm.ops import reference
from fastllm.ops.attention import attention


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, H) at positions rows (B, R) -> (B, R, H)."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, R, H)


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
        self._grads = {name: GradBuffer() for name in ("q", "kv", "qkv", "out")}  # fastllm.nn.linear
        self._init_kernels(kernels)

    def _split(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def accepts_query_rows(self) -> bool:
        """Whether forward(query_rows=...) can project only the queried rows (a plain, unsharded qkv)."""
        return not self.cross and self.rotary is None and type(self.qkv) is nn.Linear

    def _project_rows(self, x, rows):
        """q on the positions rows (B, R) of x only; k and v on all positions (slices of the fused qkv)."""
        hq, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        xq = gather_rows(x, rows)  # (B, R, H)
        q, kv = row_split_linear(self.qkv, xq, x, hq, self._grads["qkv"])  # (B, R, hq), (B, T, 2 kvd)
        k, v = kv.split([kvd, kvd], dim=-1)  # (B, T, kvd) each
        return self._split(q, self.heads), self._split(k, self.kv_heads), self._split(v, self.kv_heads)

    def _project(self, x, memory, past, rows=None):
        kvd = self.kv_heads * self.head_dim
        if rows is not None:
            return self._project_rows(x, rows)
        if not self.cross:
            qkv = linear(self.qkv, x, self._grads["qkv"])  # (B, T, (heads + 2 kv_heads) D)
            q, k, v = qkv.split([self.heads * self.head_dim, kvd, kvd], dim=-1)  # (B, T, *)
            return self._split(q, self.heads), self._split(k, self.kv_heads), self._split(v, self.kv_heads)
        q = self._split(linear(self.q, x, self._grads["q"]), self.heads)  # (B, H, Tq, D)
        if past is not None:
            return q, None, None  # cross keys/values come from the cache
        k, v = linear(self.kv, memory, self._grads["kv"]).split([kvd, kvd], dim=-1)  # (B, Tk, kvd) each
        return q, self._split(k, self.kv_heads), self._split(v, self.kv_heads)

    def _with_past(self, k, v, past):
        if past is None:
            return k, v
        if self.cross:
            return past
        return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, Hkv, P + T, D)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None = None, key_padding_mask=None,
                causal: bool = False, past_key_value=None, use_cache: bool = False, positions=None,
                output_attentions: bool = False, query_rows: torch.Tensor | None = None):
        """x (B, Tq, H) -> (out (B, Tq, H), present (k, v) or None, probabilities or None).

        With query_rows (B, R): out is (B, R, H), the rows of x at those positions."""
        if self.cross and memory is None and past_key_value is None:
            raise ValueError("MultiHeadAttention(cross=True) needs `memory` or a cached past_key_value")
        if query_rows is not None and (causal or past_key_value is not None or not self.accepts_query_rows()):
            raise ValueError("MultiHeadAttention: query_rows needs non-causal self-attention with a plain "
                             "nn.Linear qkv, no rotary embedding and no KV cache")
        q, k, v = self._project(x, memory, past_key_value, query_rows)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        k, v = self._with_past(k, v, past_key_value)
        probs = self._probs(q, k, causal, key_padding_mask) if output_attentions else None
        p = self.dropout_p if self.training else 0.0
        o = attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=p, scale=self.scale,
                      backend=self.backend["attention"])  # (B, H, Tq, D)
        o = o.transpose(1, 2).flatten(2)  # (B, Tq, H*D)
        return linear(self.out, o, self._grads["out"]), ((k, v) if use_cache else None), probs

    def _probs(self, q, k, causal, key_padding_mask) -> torch.Tensor:
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # (B, H, Tk, D)
        s = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale  # (B, H, Tq, Tk)
        allowed = reference._allowed(q.shape[0], q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
        return reference._masked_softmax(s, allowed).detach()  # (B, H, Tq, Tk)
