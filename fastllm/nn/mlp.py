"""Position-wise feed-forward network: fc_in -> activation -> fc_out, with GELU, GELU-tanh, ReLU or SwiGLU.

Invariants:
- gelu is the exact erf form (BERT, HF "gelu"); gelu_tanh the tanh approximation (GPT-2, HF "gelu_new");
  swiglu splits fc_in's output into (gate, up) halves and returns fc_out(silu(gate) * up) (Shazeer 2020),
  so fc_in has 2 * intermediate outputs.
- Dropout (hidden dropout) is applied by the enclosing block, not here.
- fc_in and fc_out run through fastllm.nn.linear: their weight gradients reuse a buffer across steps, and with
  GELU the activation is recomputed in the backward from fc_in's output instead of being saved (gelu_linear).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.nn.linear import GradBuffer, gelu_linear, linear

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
GELU_FORMS = {"gelu": "none", "gelu_tanh": "tanh"}  # F.gelu's approximate=


def activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind in GELU_FORMS:
        return F.gelu(x, approximate=GELU_FORMS[kind])
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
        self._grad_in, self._grad_out = GradBuffer(), GradBuffer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = linear(self.fc_in, x, self._grad_in)  # (B, T, I)
        if self.activation in GELU_FORMS:  # the activation is recomputed in the backward, not saved
            return gelu_linear(self.fc_out, u, self._grad_out, GELU_FORMS[self.activation])  # (B, T, H)
        return linear(self.fc_out, activate(u, self.activation), self._grad_out)  # (B, T, H)
