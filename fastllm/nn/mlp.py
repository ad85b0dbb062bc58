"""Position-wise feed-forward network: fc_in -> activation -> fc_out, with GELU, GELU-tanh, ReLU or SwiGLU.

Invariants:
- gelu is the exact erf form (BERT, HF "gelu"); gelu_tanh the tanh approximation (GPT-2, HF "gelu_new");
  swiglu splits fc_in's output into (gate, up) halves and returns fc_out(silu(gate) * up) (Shazeer 2020),
  so fc_in has 2 * intermediate outputs.
- Dropout (hidden dropout) is applied by the enclosing block, not here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")


def activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    gate, up = x.chunk(2, dim=-1)  # (..., I) each
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        width = 2 * intermediate_size if activation == "swiglu" else intermediate_size
        self.fc_in = nn.Linear(hidden_size, width, bias=bias)
        self.fc_out = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(activate(self.fc_in(x), self.activation))  # (B, T, H)
