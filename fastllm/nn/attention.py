"""fastllm.nn.Attention: multi-head self- or cross-attention on fastllm.ops.attention, with GQA and a KV cache.

Invariants:
- Self-attention projects q, k, v with one fused Linear (d_model -> (H + 2 Hkv) * Dh); cross-attention projects
  q from x and k, v from `memory` with one fused kv Linear ((2 Hkv) * Dh). Output projection d_model -> d_model.
- num_kv_heads (default num_heads) must divide num_heads (grouped / multi-query attention).
- key_padding_mask (B, Tk) bool, True = attend. Attention dropout is active only in training mode.
- KVCache holds (B, Hkv, T, Dh) keys and values; forward(x, cache=c) appends the new positions and attends over
  all of them with the causal offset Tk - Tq (so Tq = 1 is one decoding step).
- The backend is chosen when the module is built and again only when it moves to another device type
  (`_apply`), never inside forward().
"""
from __future__ import annotations

import torch
from torch import nn

from fastllm.ops import backends
from fastllm.ops.attention import attention


class KVCache:
    """Keys and values of the positions seen so far, (B, Hkv, T, Dh) each; grows by concatenation."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds (B, Hkv, t, Dh) new keys/values; returns all keys and values so far."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)  # (B, Hkv, T, Dh)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)  # (B, Hkv, T, Dh)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, *, dropout: float = 0.0,
                 bias: bool = True, cross: bool = False, causal: bool = False, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if d_model % num_heads:
            raise ValueError(f"Attention: d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Attention: dropout must be in [0, 1), got {dropout}")
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim, self.dropout, self.cross, self.causal = d_model // num_heads, dropout, cross, causal
        kw = {"device": device, "dtype": dtype, "bias": bias}
        kv_dim = 2 * num_kv_heads * self.head_dim
        if cross:
            self.q_proj = nn.Linear(d_model, d_model, **kw)
            self.kv_proj = nn.Linear(d_model, kv_dim, **kw)
        else:
            self.qkv_proj = nn.Linear(d_model, d_model + kv_dim, **kw)
        self.out_proj = nn.Linear(d_model, d_model, **kw)
        self.requested_backend = backend
        self.backend = backends.select("attention", torch.device(device or "cpu"), backend)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.backend = backends.select("attention", self.out_proj.weight.device, self.requested_backend)
        return out

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, Dh)

    def _project(self, x: torch.Tensor, memory: torch.Tensor | None):
        hd, nkv = self.head_dim, self.num_kv_heads
        if self.cross:
            if memory is None:
                raise ValueError("Attention(cross=True).forward needs `memory`")
            q = self.q_proj(x)  # (B, Tq, d_model)
            k, v = self.kv_proj(memory).split(nkv * hd, dim=-1)  # (B, Tk, Hkv*Dh) each
        else:
            q, k, v = self.qkv_proj(x).split([self.d_model, nkv * hd, nkv * hd], dim=-1)
        return self._heads(q, self.num_heads), self._heads(k, nkv), self._heads(v, nkv)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                generator_seed: int | None = None) -> torch.Tensor:
        """x (B, Tq, d_model) [, memory (B, Tk, d_model)] -> (B, Tq, d_model)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Attention: x must be (B, T, {self.d_model}), got {tuple(x.shape)}")
        q, k, v = self._project(x, memory)  # (B, H, Tq, Dh), (B, Hkv, Tk, Dh) x 2
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, T_cached + Tk, Dh)
        p = self.dropout if self.training else 0.0
        out = attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, dropout_p=p,
                        generator_seed=generator_seed, backend=self.backend)  # (B, H, Tq, Dh)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.d_model))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"cross={self.cross}, causal={self.causal}, dropout={self.dropout}, backend={self.backend}")
