"""Output heads: BERT pooler, the MLM prediction transform, and the vocabulary loss on fused linear CE.

Invariants:
- Pooler: tanh(dense(hidden[:, 0])) (the [CLS] position), (B, H) -> (B, H).
- PredictionTransform: LN(act(dense(x))) as BERT's cls.predictions.transform; applied to any (N, H) rows.
- vocab_loss(hidden (N, H), weight (V, H), labels (N,), bias) = mean CE of hidden @ weight.T + bias over rows
  whose label != ignore_index, through fastllm.ops.linear_cross_entropy: no (N, V) logits are materialized.
  Under autocast the matmul inputs are cast to the autocast dtype, as torch.nn.functional.linear would be.
  In eager fp32 training on the cpu backend, the weight gradient is written into a GradBuffer
  (fastllm.nn.linear) reused across steps, through linear_cross_entropy_into: the same gradients, without a
  fresh (V, H) zero-filled tensor (93 MiB for BERT's vocabulary) page-faulted in on every step. The buffer is
  reused only when nothing else holds it (see GradBuffer); release_grad_buffers(model) frees it.
- masked_rows(hidden (B, T, H), labels (B, T)) -> (rows (M, H), labels (M,)) keeps only labelled positions,
  so an MLM head runs on the ~15% masked tokens only. M is data-dependent (a graph break under torch.compile),
  so compiled models skip it and keep all rows (see BERT's _MLMHead.masked_loss).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastllm.nn._kernels import KernelChoice, apply_norm, make_layer_norm
from fastllm.nn.linear import GradBuffer, grad_alias
from fastllm.nn.mlp import activate
from fastllm.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_into, scale_precomputed


class Pooler(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, H)


class PredictionTransform(nn.Module):
    def __init__(self, hidden_size: int, activation: str, eps: float, kernels: str = "auto"):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = activation
        self.norm = make_layer_norm(hidden_size, eps, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_norm(self.norm, activate(self.dense(x), self.activation))  # (..., H)


def masked_rows(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Rows of hidden (B, T, H) whose label is not ignore_index: ((M, H), (M,))."""
    flat = labels.reshape(-1)  # (B*T,)
    idx = (flat != ignore_index).nonzero().squeeze(1)  # (M,)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx), flat.index_select(0, idx)


class _BufferedLoss(torch.autograd.Function):
    """Mean linear cross-entropy whose weight gradient lands in a GradBuffer (the forward computes every
    gradient, as linear_cross_entropy does for a mean; the backward only scales them by d output)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options: dict, grad_buffer: GradBuffer):
        gw = grad_buffer.take(weight)  # (V, H), nothing else holds it
        loss, gh, gb = linear_cross_entropy_into(hidden, weight, labels, gw, bias=bias, **options)
        # An alias, not gw itself: the saved tensor then counts as a second user of the storage, so a forward
        # before this backward (micro-batches, a second loss term) takes a new buffer instead of overwriting it.
        ctx.save_for_backward(gh, grad_alias(gw), gb)
        return loss  # () fp32

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        gh, gw, gb = ctx.saved_tensors
        # gw as a new tensor object: AccumulateGrad adopts it as .grad without a copy
        gh, gw, gb = scale_precomputed(dloss, gh, grad_alias(gw), gb)
        need = ctx.needs_input_grad
        return (gh if need[0] else None), (gw if need[1] else None), (gb if need[2] else None), None, None, None


class VocabLoss(KernelChoice):
    """Holds the backend choice of linear_cross_entropy; forward(hidden, weight, labels, bias) -> loss."""

    OPS = ("linear_cross_entropy",)

    def __init__(self, label_smoothing: float = 0.0, kernels: str = "auto"):
        super().__init__()
        self.label_smoothing = label_smoothing
        self._init_kernels(kernels)
        self._grad = GradBuffer()

    def _buffered(self, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
        """Eager fp32 CPU training on the cpu backend with a weight gradient: the GradBuffer path."""
        fp32_cpu = hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32
        training = weight.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        return (self.backend["linear_cross_entropy"] == "cpu" and fp32_cpu and training
                and not torch.is_autocast_enabled("cpu"))

    def forward(self, hidden, weight, labels, bias=None, ignore_index: int = -100):
        if self._buffered(hidden, weight):
            options = {"ignore_index": ignore_index, "label_smoothing": self.label_smoothing}
            return _BufferedLoss.apply(hidden, weight, bias, labels, options, self._grad)
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if weight.dtype != hidden.dtype:
            hidden = hidden.to(weight.dtype)
        return linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                    label_smoothing=self.label_smoothing,
                                    backend=self.backend["linear_cross_entropy"]).float()


class ClassLoss(KernelChoice):
    """Mean cross-entropy of (N, C) logits against (N,) labels on fastllm.ops.cross_entropy (backend at build)."""

    OPS = ("cross_entropy",)

    def __init__(self, kernels: str = "auto"):
        super().__init__()
        self._init_kernels(kernels)

    def forward(self, logits, labels, ignore_index: int = -100):
        from fastllm.ops.cross_entropy import cross_entropy

        return cross_entropy(logits.float(), labels.reshape(-1).long(), ignore_index=ignore_index,
                             backend=self.backend["cross_entropy"])
