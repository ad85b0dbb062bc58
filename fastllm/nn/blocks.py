"""Transformer blocks (self-attention, optional cross-attention, MLP) in post-LN or pre-LN form.

Invariants:
- post-LN (BERT, Vaswani et al.): x <- LN(x + drop(attn(x))) [; x <- LN(x + drop(cross(x, memory)))];
  x <- LN(x + drop(mlp(x))). Every residual add is fused into its LayerNorm (fastllm.ops.layer_norm with
  residual). forward(x, ...) -> BlockOutput with hidden = x (residual None).
- pre-LN (GPT-2): the residual stream is carried as (delta, residual) with stream = delta + residual, so that
  each add is fused into the next LayerNorm: y, h = LN1(delta, residual); h += drop(attn(y)) happens inside
  LN2 the same way. The block returns (hidden = the last drop(mlp) delta, residual = h); the model's final
  LayerNorm takes both. residual None means "the stream is `hidden`" (the first block).
- query_rows (B, R) (non-causal self-attention blocks whose attention accepts_query_rows): the block computes
  its output only at those positions, (B, R, H); keys and values still see every position of x.
- Dropout modules act only in training mode; block parameter names: attn, cross, mlp, norm1/norm2/norm3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastllm.nn._kernels import apply_norm, make_layer_norm
from fastllm.nn.dropout import Dropout
from fastllm.nn.mha import MultiHeadAttention, gather_rows
from fastllm.nn.mlp import MLP


@dataclass
class BlockSpec:
    """Everything a TransformerBlock needs; models build it from their typed config."""
    hidden_size: int
    num_heads: int
    intermediate_size: int
    activation: str = "gelu"
    norm: str = "post"  # "post" | "pre"
    num_kv_heads: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.1
    eps: float = 1e-12
    cross_attention: bool = False
    bias: bool = True
    kernels: str = "auto"


@dataclass
class BlockOutput:
    hidden: torch.Tensor  # (B, T, H): the block output (post-LN) or the last residual delta (pre-LN)
    residual: torch.Tensor | None  # (B, T, H) pre-LN stream without `hidden`; None for post-LN
    present: tuple | None  # ((k, v) self, (k, v) cross or None) when use_cache
    attentions: torch.Tensor | None  # (B, heads, T, Tk) when output_attentions


class TransformerBlock(nn.Module):
    def __init__(self, spec: BlockSpec, rotary=None, scale: float | None = None):
        super().__init__()
        if spec.norm not in ("pre", "post"):
            raise ValueError(f"TransformerBlock: norm must be 'pre' or 'post', got {spec.norm!r}")
        self.pre = spec.norm == "pre"
        mha = {"dropout": spec.attention_dropout, "bias": spec.bias, "scale": scale, "kernels": spec.kernels}
        self.attn = MultiHeadAttention(spec.hidden_size, spec.num_heads, spec.num_kv_heads, rotary=rotary, **mha)
        self.norm1 = make_layer_norm(spec.hidden_size, spec.eps, spec.kernels)
        self.cross = None
        if spec.cross_attention:
            self.cross = MultiHeadAttention(spec.hidden_size, spec.num_heads, spec.num_kv_heads, cross=True, **mha)
            self.norm3 = make_layer_norm(spec.hidden_size, spec.eps, spec.kernels)
        self.mlp = MLP(spec.hidden_size, spec.intermediate_size, spec.activation, spec.bias)
        self.norm2 = make_layer_norm(spec.hidden_size, spec.eps, spec.kernels)
        self.drop = Dropout(spec.dropout, spec.kernels)

    def forward(self, x, residual=None, *, key_padding_mask=None, causal=False, memory=None,
                memory_mask=None, past=None, use_cache=False, positions=None, output_attentions=False,
                query_rows=None):
        if query_rows is not None and not self.accepts_query_rows():
            raise ValueError("TransformerBlock: query_rows needs a block without cross-attention whose "
                             "self-attention has a plain nn.Linear qkv and no rotary embedding")
        past_self, past_cross = past if past is not None else (None, None)
        kw = {"use_cache": use_cache, "output_attentions": output_attentions}
        if self.pre:
            y, h = apply_norm(self.norm1, x, residual) if residual is not None else (apply_norm(self.norm1, x), x)
        else:
            y, h = x, None
        a, p_self, probs = self.attn(y, key_padding_mask=key_padding_mask, causal=causal, past_key_value=past_self,
                                     positions=positions, query_rows=query_rows, **kw)
        if query_rows is not None:  # from here on the block works on the queried rows only
            y = gather_rows(y, query_rows)  # (B, R, H)
            h = None if h is None else gather_rows(h, query_rows)  # (B, R, H)
        after_attn = self.norm3 if self.cross is not None else self.norm2
        y, h = self._add_norm(a, y, h, post=self.norm1, pre_next=after_attn)
        p_cross = None
        if self.cross is not None:
            c, p_cross, _ = self.cross(y, memory=memory, key_padding_mask=memory_mask, past_key_value=past_cross,
                                       **kw)
            y, h = self._add_norm(c, y, h, post=self.norm3, pre_next=self.norm2)
        m = self.drop(self.mlp(y))  # (B, T, H)
        if not self.pre:
            y, h = apply_norm(self.norm2, m, y)[0], None
        else:
            y = m
        return BlockOutput(y, h, (p_self, p_cross) if use_cache else None, probs)

    def accepts_query_rows(self) -> bool:
        """Whether forward(query_rows=...) is supported (see the module docstring)."""
        return self.cross is None and self.attn.accepts_query_rows()

    def _add_norm(self, delta, y, h, *, post, pre_next):
        """Adds drop(delta) to the stream and normalizes: returns (input of the next sublayer, stream)."""
        delta = self.drop(delta)  # (B, T, H)
        if not self.pre:
            return apply_norm(post, delta, y)[0], None  # LN(y + delta)
        return apply_norm(pre_next, delta, h)  # (LN(h + delta), h + delta)
