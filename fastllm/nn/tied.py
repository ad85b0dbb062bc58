"""Tied word embeddings whose two gradients land in one (V, H) buffer.

A tied weight W (the input lookup and the output head) gets two gradients per backward: the head's dense (V, H)
one (from linear_cross_entropy) and the lookup's rows. Plain autograd materializes the lookup's as a second
dense (V, H) tensor (a zero fill and a scatter), then adds the two: two extra passes over V * H floats and a
second buffer of that size. TiedGrad avoids both: `head_weight(W, embedding)` passes W through an identity whose
backward hands the head's gradient buffer to TiedGrad, and `lookup(embedding, ids)` adds its rows into that buffer
in place and returns no gradient of its own. The sum autograd would form is formed in place instead.

Invariants:
- Within one backward (graph task) the head's gradient reaches TiedGrad before the lookup's backward runs:
  the head is downstream of the lookup, and the engine runs ready nodes newest first. The lookup uses the buffer
  only if it was handed over in the same graph task (torch._C._current_graph_task_id), with grad mode off (no
  double backward), without retain_graph (a retained node may return the same tensor again) and in W's dtype;
  otherwise it returns its own dense gradient, exactly as F.embedding would.
- Both gradients still flow into W's AccumulateGrad, which runs after both nodes: hooks on W see the sum.
- The buffer reference is dropped when the lookup takes it, and at the end of the graph task in any case, so
  AccumulateGrad can adopt the buffer as W.grad without a copy and nothing of size V * H outlives a backward.
- padding_idx rows get no gradient (as F.embedding). Only used eagerly: under torch.compile, or when W needs no
  gradient, both calls are the plain embedding(ids) / W. Both calls take the embedding module and act only while
  it is a plain nn.Embedding (plain_embedding): a vocabulary-parallel shard, say, keeps its own lookup and its head
  the plain weight. head_weight returns an alias of W, without W's Python attributes.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def plain_embedding(m) -> bool:
    """Whether `m` is a plain nn.Embedding (no max_norm renorm, no sparse gradient): the lookup TiedGrad covers.
    Anything else (a vocabulary-parallel shard, say) keeps its own lookup, and its head the plain weight."""
    return type(m) is nn.Embedding and m.max_norm is None and not m.sparse


def _graph_task() -> int:
    return torch._C._current_graph_task_id()


def _keeps_graph() -> bool:
    """Whether this backward retains the graph (retain_graph=True): then nodes may hand out the same gradient
    tensor again (linear_cross_entropy returns the gradients its forward saved), so it must not be written."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


class TiedGrad:
    """The hand-over slot between the head's and the lookup's backward of one tied weight."""

    def __init__(self):
        self._buffer: weakref.ref | None = None  # weak: see give()
        self._task = -1

    def __getstate__(self) -> dict:
        return {}  # nothing outlives a backward: copies and pickles start empty

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _active(self, weight: torch.Tensor) -> bool:
        return weight.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def head_weight(self, weight: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        """W (embedding's weight) for the output head; its gradient is handed to the lookup (see the module doc)."""
        return _HandOver.apply(weight, self) if plain_embedding(embedding) and self._active(weight) else weight

    def lookup(self, embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """embedding(ids), whose weight gradient is added into the head's buffer when embedding is plain."""
        if not plain_embedding(embedding) or not self._active(embedding.weight):
            return embedding(ids)
        return _Lookup.apply(embedding.weight, ids, self, embedding.padding_idx)

    def give(self, grad: torch.Tensor) -> None:
        """Keeps a weak reference only: while autograd holds the buffer alone, it may add other gradients of W
        into it in place (the lookup then adds into the sum); if it replaced the buffer by an out-of-place sum,
        the reference dies with it and the lookup falls back to its own dense gradient. A strong reference
        would make that sum out of place and lose the lookup's rows."""
        self._buffer, self._task = weakref.ref(grad), _graph_task()
        torch.autograd.Variable._execution_engine.queue_callback(self.clear)

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        """The head's buffer of this graph task if it can take an in-place add of rows like `like`."""
        buf = None if self._buffer is None else self._buffer()
        ok = self._task == _graph_task() and not torch.is_grad_enabled()
        self.clear()
        if buf is None or not ok or buf.dtype != like.dtype or buf.device != like.device:
            return None
        return buf if buf.is_contiguous() and buf._base is None else None

    def clear(self) -> None:
        self._buffer, self._task = None, -1


class _HandOver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, tie):
        ctx.tie = tie
        return weight.view_as(weight)  # (V, H), an alias: the head reads W itself

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and not torch.is_grad_enabled() and not _keeps_graph():
            ctx.tie.give(grad)
        return grad, None


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, tie, padding_idx):
        ctx.save_for_backward(ids)
        ctx.tie, ctx.padding_idx, ctx.shape = tie, padding_idx, weight.shape
        return F.embedding(ids, weight, padding_idx)  # (*ids.shape, H)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(-1)  # (N,)
        rows = grad.reshape(flat.numel(), -1)  # (N, H)
        if ctx.padding_idx is not None:
            rows = rows.masked_fill((flat == ctx.padding_idx).unsqueeze(1), 0.0)  # (N, H)
        buf = ctx.tie.take(rows)
        if buf is not None:
            buf.index_add_(0, flat, rows)  # (V, H): the head's gradient plus this lookup's
            return None, None, None, None
        return rows.new_zeros(ctx.shape).index_add_(0, flat, rows), None, None, None
