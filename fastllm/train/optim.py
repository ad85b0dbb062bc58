"""AdamW parameter groups (the parallel engine's optimizer and the tests use the same rule).

Invariants: parameters with fewer than 2 dimensions (biases, LayerNorm weights and biases) get no weight decay;
every trainable parameter is in exactly one group; group order is deterministic (module order).
"""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
