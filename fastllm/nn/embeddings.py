"""Input embeddings: tokens, learned / sinusoidal / rotary positions, token types; LayerNorm and dropout.

Invariants:
- Embeddings.forward(input_ids (B, T), token_type_ids, position_ids) -> (B, T, H); ids are checked against
  the vocabulary, the type vocabulary and max_positions with errors naming the argument and the bad value.
- position="learned": a (max_positions, H) table (BERT, GPT-2); "sinusoidal": the fixed table of Vaswani et al.
  (a buffer, not a parameter, not saved); "rope" / "none": nothing is added here (RoPE rotates q and k inside
  attention, see RotaryEmbedding).
- scale_embeddings multiplies token embeddings by sqrt(H) (the encoder-decoder paper does this).
- Parameter names: word, position, token_type, norm (for HF import: word_embeddings, position_embeddings, ...).
- A model whose output head reuses word.weight calls tie_output() and passes the head's weight through
  TiedGrad.head_weight: the lookup's gradient rows are then added into the head's gradient buffer
  (fastllm.nn.tied) instead of a second (V, H) tensor.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastllm.nn._kernels import apply_norm, make_layer_norm
from fastllm.nn.dropout import Dropout
from fastllm.nn.tied import TiedGrad

POSITION_KINDS = ("learned", "sinusoidal", "rope", "none")


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    """(n, dim) table: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * inv)  # (n, ceil(dim/2))
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]  # (n, floor(dim/2))
    return table


def check_ids(name: str, ids: torch.Tensor, limit: int, what: str) -> None:
    """ids must be integers in [0, limit); the error names the argument, the bad value and the limit."""
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name} contains {bad}, outside [0, {limit}) ({what})")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) on the first `rotary_dim` dims of each head, half-split layout."""

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv  # (P, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotates x (B, H, T, D) at positions (B, T)."""
        cos = self.cos[positions][:, None].to(x.dtype)  # (B, 1, T, D/2)
        sin = self.sin[positions][:, None].to(x.dtype)  # (B, 1, T, D/2)
        a, b = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)  # (B, H, T, D)


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, *, position: str = "learned",
                 type_vocab_size: int = 0, layer_norm: bool = False, eps: float = 1e-12, dropout: float = 0.0,
                 scale_embeddings: bool = False, padding_idx: int | None = None, kernels: str = "auto"):
        super().__init__()
        if position not in POSITION_KINDS:
            raise ValueError(f"Embeddings: position must be one of {POSITION_KINDS}, got {position!r}")
        self.vocab_size, self.max_positions, self.position_kind = vocab_size, max_positions, position
        self.type_vocab_size, self.scale = type_vocab_size, math.sqrt(hidden_size) if scale_embeddings else 1.0
        self.word = nn.Embedding(vocab_size, hidden_size, padding_idx=padding_idx)
        self.position = nn.Embedding(max_positions, hidden_size) if position == "learned" else None
        if position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(max_positions, hidden_size), persistent=False)
        self.token_type = nn.Embedding(type_vocab_size, hidden_size) if type_vocab_size > 0 else None
        self.norm = make_layer_norm(hidden_size, eps, kernels) if layer_norm else None
        self.dropout = Dropout(dropout, kernels)
        self.tied: TiedGrad | None = None  # set by tie_output(): the word weight is also an output matrix

    def tie_output(self) -> TiedGrad:
        """The TiedGrad through which an output head that reuses `word.weight` shares its gradient buffer."""
        if self.tied is None:
            self.tied = TiedGrad()
        return self.tied

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """word(input_ids) (B, T, H); through the TiedGrad when the weight is tied to an output head."""
        return self.word(input_ids) if self.tied is None else self.tied.lookup(self.word, input_ids)

    def check(self, input_ids, token_type_ids=None, position_ids=None, past_length: int = 0) -> None:
        """Errors naming the argument for out-of-range ids or a sequence longer than max_positions."""
        total = past_length + input_ids.shape[-1]
        if self.position_kind != "none" and total > self.max_positions:
            raise ValueError(f"input_ids: sequence length {total} exceeds max_position_embeddings "
                             f"{self.max_positions}")
        check_ids("input_ids", input_ids, self.vocab_size, "vocab_size")
        if position_ids is not None and self.position_kind != "none":
            check_ids("position_ids", position_ids, self.max_positions, "max_position_embeddings")
        if token_type_ids is not None:
            check_ids("token_type_ids", token_type_ids, max(self.type_vocab_size, 1), "type_vocab_size")

    def default_positions(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        t = input_ids.shape[-1]
        return torch.arange(past_length, past_length + t, device=input_ids.device).expand(input_ids.shape)  # (B, T)

    def forward(self, input_ids, token_type_ids=None, position_ids=None, past_length: int = 0):
        self.check(input_ids, token_type_ids, position_ids, past_length)
        x = self.lookup(input_ids)  # (B, T, H)
        if self.scale != 1.0:
            x = x * self.scale
        if self.token_type is not None:  # added before positions, in HF BERT's order (same rounding)
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids  # (B, T)
            x = x + self.token_type(types)
        if self.position_kind in ("learned", "sinusoidal"):
            pos = self.default_positions(input_ids, past_length) if position_ids is None else position_ids
            table = self.position(pos) if self.position is not None else self.sinusoid[pos]  # (B, T, H)
            x = x + table
        if self.norm is not None:
            x = apply_norm(self.norm, x)
        return self.dropout(x)  # (B, T, H)
