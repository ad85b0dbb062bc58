"""Megatron-style tensor parallelism (Shoeybi et al. 2019), applied as a function to a built single-device model.

Invariants:
- apply_tensor_parallel(model, mesh) works in place on a model every tp rank built identically (same config,
  same seed): each rank slices its shard out of the canonical weights. Parameter names stay canonical; the
  optimizer must be built afterwards (sharded parameters are new Parameter objects). tp == 1 changes nothing
  but model.tp_mesh.
- A sharded parameter p carries p.tp_dim (the split dimension) and p.tp_index (LongTensor: for each local slice
  along tp_dim, its index in the canonical tensor; -1 marks vocabulary padding). Replicated parameters carry
  neither; they see identical gradients on every tp rank, so no extra reduction is needed.
- Conjugate operators: copy_to_tp (f) is identity forward / all-reduce of the gradient backward at the entry of
  a parallel region; reduce_from_tp (g) is all-reduce forward / identity backward at its exit. Every activation
  outside attention heads, MLP intermediate units and vocabulary shards is replicated across tp ranks (without
  sequence parallelism, below).
- Attention: rank r owns q heads [r H/tp, (r+1) H/tp) and kv heads [r Hkv/tp, (r+1) Hkv/tp), so each GQA group
  stays on one rank. MLP: intermediate units [r I/tp, (r+1) I/tp) (SwiGLU: the same units of gate and up).
- Vocabulary: padded to Vp = ceil(V / tp) * tp; rank r owns rows [r Vp/tp, (r+1) Vp/tp) of the word
  embedding, of an untied LM head and of BERT's MLM bias. Padding rows are zero, excluded from the loss (their
  logits are -inf) and get zero gradient. Eval-mode logits are local (..., Vp/tp) shards: gather_vocab_logits
  makes them (..., V). (Those local logits do not pass through copy_to_tp: do not backpropagate through them.)
- VocabParallelLoss never gathers logits: per row the global max, sum of exponentials, target logit and logit sum
  are all-reduced; loss = (1 - s) nll + s * mean over the real V classes of -log p (F.cross_entropy's smoothing).
- Errors (heads, kv heads or MLP width not divisible by tp; applying twice) are TensorParallelError, raised on
  every rank before any collective.
- Dropout: replicated activations draw identical masks on every rank (same seed, same calls); attention dropout
  inside local heads draws the same masks on every rank for different heads (not the single-device stream).
- Sequence parallelism (Korthikanti et al. 2022; apply_tensor_parallel(..., sequence_parallel=True), GPT and
  BERT): activations outside the parallel matmuls (embedding output, LayerNorms, dropouts, residual adds, GPT's
  (delta, residual) pair) are (B, T/tp, H): rank r holds positions [r T/tp, (r+1) T/tp). f becomes an all-gather
  along T (backward: reduce-scatter), run by a forward pre-hook at the entry of each attention / MLP module, so
  attention sees the full T (masks, causality and RoPE positions unchanged) and ColumnParallelLinear's own f is
  the identity; g (RowParallelLinear, VocabParallelEmbedding) becomes a reduce-scatter along T (backward: all-
  gather). Position / token-type tables look up this rank's positions only (a pre-hook slices their ids). The
  sequence is all-gathered (backward: this rank's chunk of the replicated gradient) where it leaves the region:
  GPT's ln_f output, BERT's last block output, so heads, losses and logits are unchanged. T % tp != 0 is a
  TensorParallelError naming T and tp, raised on every tp rank before the first collective.
- SP parameters (LayerNorms in the region, RowParallelLinear biases, position / token-type tables) see only their
  rank's positions, so their gradients are partial: they carry p.sequence_parallel = True and
  sync_sequence_parallel_grads sums them over tp (ParallelEngine.finish_grads, before clipping); afterwards they
  are replicated like any other unsharded parameter. SP dropout (SequenceParallelDropout) draws the full-sequence
  counter-hash mask, its seed from the shared RNG stream, and keeps its chunk: the same masks as without SP.
  Parameter names do not change. Model outputs' hidden_states inside the stack are T/tp shards.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastllm.models.bert import BertModel, _MLMHead
from fastllm.models.gpt import GPT
from fastllm.nn.blocks import TransformerBlock
from fastllm.nn.dropout import Dropout
from fastllm.nn.embeddings import Embeddings
from fastllm.nn.heads import VocabLoss
from fastllm.nn.mha import MultiHeadAttention
from fastllm.nn.mlp import MLP
from fastllm.ops.cross_entropy import auto_chunk_size
from fastllm.ops.dropout import dropout
from fastllm.parallel.mesh import Mesh, all_reduce


class TensorParallelError(ValueError):
    """A model that cannot be split over the tensor-parallel ranks (names the size and tp)."""


# ---------------------------------------------------------------------- conjugate operators f and g
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.mesh, "tp"), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        return all_reduce(x.clone(memory_format=torch.contiguous_format), mesh, "tp")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """f: identity forward, gradient summed over tp backward (entry of a parallel region)."""
    return x if mesh.size("tp") == 1 else _CopyToTP.apply(x, mesh)


def reduce_from_tp(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """g: sum over tp forward, identity backward (exit of a parallel region)."""
    return x if mesh.size("tp") == 1 else _ReduceFromTP.apply(x, mesh)


# ---------------------------------------------------------------------- shard indices and canonical tensors
def block(n: int, tp: int, rank: int) -> torch.Tensor:
    """Indices [rank n/tp, (rank+1) n/tp) of a dimension n divisible by tp."""
    k = n // tp
    return torch.arange(rank * k, (rank + 1) * k)


def vocab_index(vocab: int, tp: int, rank: int) -> torch.Tensor:
    """This rank's rows of the vocabulary padded to a multiple of tp; -1 marks padding rows."""
    per = -(-vocab // tp)
    idx = torch.arange(rank * per, (rank + 1) * per)
    return idx.masked_fill(idx >= vocab, -1)


def _take(full: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """full's slices `index` along dim (a new tensor); -1 entries give zero slices."""
    index = index.to(full.device)
    out = full.index_select(dim, index.clamp(min=0))
    pad = (index < 0).nonzero().squeeze(1)
    return out.index_fill_(dim, pad, 0) if pad.numel() else out


def _local_param(full: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(_take(full.detach(), dim, index), requires_grad=full.requires_grad)
    p.tp_dim, p.tp_index = dim, index
    return p


def shard_canonical(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of the canonical tensor `full` in p's layout (full itself when p is replicated)."""
    return _take(full, p.tp_dim, p.tp_index) if hasattr(p, "tp_dim") else full


def _all_gather(t: torch.Tensor, mesh: Mesh) -> list[torch.Tensor]:
    if mesh.size("tp") == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(mesh.size("tp"))]
    dist.all_gather(parts, t.contiguous(), group=mesh.group("tp"))
    return parts


def gather_canonical(local: torch.Tensor, p: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The canonical full tensor from every rank's `local` (p's value or gradient); collective over tp."""
    if not hasattr(p, "tp_dim"):
        return local
    d = p.tp_dim
    cat = torch.cat(_all_gather(local.detach(), mesh), dim=d)  # every rank's slices, rank order
    index = torch.cat(_all_gather(p.tp_index.to(local.device), mesh))  # (tp * n_local,)
    real = (index >= 0).nonzero().squeeze(1)  # positions in `cat` that are not padding
    shape = list(local.shape)
    shape[d] = real.numel()
    return local.new_empty(shape).index_copy_(d, index[real], cat.index_select(d, real))


def gather_vocab_logits(local_logits: torch.Tensor, vocab_size: int, mesh: Mesh) -> torch.Tensor:
    """(..., Vp/tp) local vocabulary logits -> (..., V) full logits, padding removed (for evaluation)."""
    return torch.cat(_all_gather(local_logits.detach(), mesh), dim=-1)[..., :vocab_size]  # (..., V)


# ---------------------------------------------------------------------- parallel layers
class ColumnParallelLinear(nn.Linear):
    """y_local = f(x) @ W[rows].T + b[rows]: output features `rows` of a canonical Linear.

    sequence_parallel: x was already all-gathered along T at the entry of the attention / MLP module (SP's f,
    which reduce-scatters the gradient), so f here is the identity."""

    sequence_parallel = False

    def __init__(self, linear: nn.Linear, rows: torch.Tensor, mesh: Mesh):
        nn.Module.__init__(self)
        self.mesh = mesh
        self.weight = _local_param(linear.weight, 0, rows)
        self.register_parameter("bias", None if linear.bias is None else _local_param(linear.bias, 0, rows))
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.sequence_parallel else copy_to_tp(x, self.mesh)
        return F.linear(x, self.weight, self.bias)  # (..., out_local)


class RowParallelLinear(nn.Linear):
    """y = g(x_local @ W[:, cols].T) + b: input features `cols` of a canonical Linear; bias replicated.

    sequence_parallel: g is a reduce-scatter along T (B, T, out) -> (B, T/tp, out), then the bias is added."""

    sequence_parallel = False

    def __init__(self, linear: nn.Linear, cols: torch.Tensor, mesh: Mesh):
        nn.Module.__init__(self)
        self.mesh = mesh
        self.weight = _local_param(linear.weight, 1, cols)
        self.register_parameter("bias", linear.bias)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = reduce_scatter_seq if self.sequence_parallel else reduce_from_tp
        y = g(F.linear(x, self.weight), self.mesh)  # (..., out); SP: (B, T/tp, out)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # the full bias, added once


class VocabParallelEmbedding(nn.Module):
    """Rows [r Vp/tp, (r+1) Vp/tp) of a token embedding; other ids give zero rows, then g sums over ranks
    (sequence_parallel: a reduce-scatter along T, (B, T, H) -> (B, T/tp, H))."""

    sequence_parallel = False

    def __init__(self, emb: nn.Embedding, mesh: Mesh):
        super().__init__()
        self.mesh, self.vocab_size, self.embedding_dim = mesh, emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx  # canonical id; its row gets no gradient, as in nn.Embedding
        index = vocab_index(emb.num_embeddings, mesh.size("tp"), mesh.tp_rank)
        self.weight = _local_param(emb.weight, 0, index)
        self.num_embeddings, self.start = index.numel(), mesh.tp_rank * index.numel()
        pad = None if emb.padding_idx is None else emb.padding_idx - self.start
        self.local_padding_idx = pad if pad is not None and 0 <= pad < self.num_embeddings else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            check_sequence_length(ids.shape[-1], self.mesh)  # before any collective, on every rank alike
        local = ids - self.start  # (B, T)
        outside = (local < 0) | (local >= self.num_embeddings)  # (B, T)
        x = F.embedding(local.masked_fill(outside, 0), self.weight, self.local_padding_idx)  # (B, T, H)
        g = reduce_scatter_seq if self.sequence_parallel else reduce_from_tp
        return g(x.masked_fill(outside[..., None], 0.0), self.mesh)  # (B, T, H); SP: (B, T/tp, H)

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.embedding_dim}, local={self.num_embeddings}, padding_idx={self.padding_idx}"


# ---------------------------------------------------------------------- vocabulary-parallel cross-entropy
def _shard_logits(h, weight, bias, valid) -> torch.Tensor:
    """(n, H) rows -> (n, Vl) fp32 local logits with padding columns at -inf."""
    x = F.linear(h, weight, bias).float()  # (n, Vl)
    return x.masked_fill(~valid, float("-inf"))


class _VocabParallelCE(torch.autograd.Function):
    """Mean CE over rows with label != ignore_index; logits are recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, smoothing, ignore_index, mesh, chunk):
        start, n_local = mesh.tp_rank * weight.shape[0], weight.shape[0]
        keep = labels != ignore_index  # (N,)
        local = labels - start  # (N,)
        mine = keep & (local >= 0) & (local < n_local)  # (N,) targets held by this rank
        local = torch.where(mine, local, 0)
        vocab = all_reduce(valid.sum().float().reshape(1), mesh, "tp")  # (1,) real vocabulary size
        lse = torch.empty(hidden.shape[0], device=hidden.device)  # (N,)
        rows = torch.zeros(hidden.shape[0], device=hidden.device)  # (N,) per-row loss
        for s in range(0, hidden.shape[0], chunk):
            e = s + chunk
            x = _shard_logits(hidden[s:e], weight, bias, valid)  # (n, Vl)
            m = all_reduce(x.max(dim=1).values, mesh, "tp", dist.ReduceOp.MAX)  # (n,)
            target = torch.where(mine[s:e], x.gather(1, local[s:e, None]).squeeze(1), 0.0)  # (n,)
            stats = torch.stack([(x - m[:, None]).exp().sum(1), target, x.masked_fill(~valid, 0.0).sum(1)])
            all_reduce(stats, mesh, "tp")  # (3, n): sum exp, target logit, logit sum over the real vocab
            lse[s:e] = m + stats[0].log()
            smooth = lse[s:e] - stats[2] / vocab
            rows[s:e] = torch.where(keep[s:e], (1 - smoothing) * (lse[s:e] - stats[1]) + smoothing * smooth, 0.0)
        count = keep.sum()
        ctx.save_for_backward(hidden, weight, bias, local, mine, keep, valid, lse, vocab, count)
        ctx.smoothing, ctx.chunk = smoothing, chunk
        return rows.sum() / count

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, local, mine, keep, valid, lse, vocab, count = ctx.saved_tensors
        s_, need = ctx.smoothing, ctx.needs_input_grad
        coef = (grad / count) * keep.float()  # (N,) d loss / d row loss
        gh = torch.zeros_like(hidden) if need[0] else None  # (N, H) partial: f sums it over tp
        gw = torch.zeros(weight.shape, device=weight.device) if need[1] else None  # (Vl, H) fp32
        gb = torch.zeros(weight.shape[0], device=weight.device) if bias is not None and need[2] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = s + ctx.chunk
            p = (_shard_logits(hidden[s:e], weight, bias, valid) - lse[s:e, None]).exp()  # (n, Vl), 0 at pads
            d = p - (s_ / vocab) * valid  # (n, Vl) smoothing target s/V on real columns only
            d[mine[s:e].nonzero().squeeze(1), local[s:e][mine[s:e]]] -= 1 - s_
            d = d * coef[s:e, None]  # (n, Vl)
            if gh is not None:
                gh[s:e] = d.to(weight.dtype) @ weight  # (n, H)
            if gw is not None:
                gw += d.t() @ hidden[s:e].float()  # (Vl, H)
            if gb is not None:
                gb += d.sum(0)  # (Vl,)
        cast = (lambda g, ref: None if g is None else g.to(ref.dtype))
        return gh, cast(gw, weight), cast(gb, weight), None, None, None, None, None, None


class VocabParallelLoss(nn.Module):
    """forward(hidden (N, H), weight_local (Vp/tp, H), labels (N,), bias_local) -> mean CE over the full vocab.

    weight_local must be a vocabulary shard (it carries tp_index); bias_local the matching shard of the bias."""

    def __init__(self, mesh: Mesh, label_smoothing: float = 0.0, chunk_size: int | None = None):
        super().__init__()
        self.mesh, self.label_smoothing, self.chunk_size = mesh, label_smoothing, chunk_size

    def forward(self, hidden, weight, labels, bias=None, ignore_index: int = -100):
        index = getattr(weight, "tp_index", None)
        if index is None:
            raise TensorParallelError("VocabParallelLoss: the output weight is not a vocabulary shard (no tp_index)")
        valid = index.to(hidden.device) >= 0  # (Vl,) real (not padding) columns
        if torch.is_autocast_enabled(hidden.device.type):  # as VocabLoss / F.linear under autocast
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if weight.dtype != hidden.dtype:
            hidden = hidden.to(weight.dtype)
        chunk = self.chunk_size or auto_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
        return _VocabParallelCE.apply(copy_to_tp(hidden, self.mesh), weight, bias, labels.reshape(-1).long(), valid,
                                      float(self.label_smoothing), int(ignore_index), self.mesh, max(chunk, 1))


# ---------------------------------------------------------------------- sequence parallelism (Korthikanti et al.)
_reduce_scatter_t = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
_all_gather_t = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def check_sequence_length(t: int, mesh: Mesh) -> None:
    """TensorParallelError unless the sequence length t splits over tp (no collective: same on every tp rank)."""
    tp = mesh.size("tp")
    if t % tp:
        raise TensorParallelError(f"sequence_parallel: the sequence length T = {t} is not divisible by tp = {tp} "
                                  f"(pad batches to a multiple of tp, or turn sequence_parallel off)")


def seq_slice(x: torch.Tensor, mesh: Mesh, dim: int = 1) -> torch.Tensor:
    """This rank's chunk [r T/tp, (r+1) T/tp) of x along `dim` (a view)."""
    n = x.shape[dim] // mesh.size("tp")
    return x.narrow(dim, mesh.tp_rank * n, n)


def _seq_all_gather(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """(B, T/tp, *) shards of every tp rank -> (B, T, *) in rank order."""
    tp, x = mesh.size("tp"), x.contiguous()
    out = x.new_empty((tp, *x.shape))  # (tp, B, T/tp, *)
    _all_gather_t(out.view(-1), x.view(-1), group=mesh.group("tp"))  # flat: the collectives split dim 0
    return out.movedim(0, 1).reshape(x.shape[0], tp * x.shape[1], *x.shape[2:])  # (B, T, *)


def _seq_reduce_scatter(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """(B, T, *) partial sums -> this rank's chunk (B, T/tp, *) of their sum over tp."""
    tp = mesh.size("tp")
    check_sequence_length(x.shape[1], mesh)
    chunks = x.reshape(x.shape[0], tp, x.shape[1] // tp, *x.shape[2:]).movedim(1, 0).contiguous()  # (tp, B, T/tp, *)
    out = x.new_empty(chunks.shape[1:])  # (B, T/tp, *)
    _reduce_scatter_t(out.view(-1), chunks.view(-1), group=mesh.group("tp"))
    return out


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh, reduce_grad):
        ctx.mesh, ctx.reduce_grad = mesh, reduce_grad
        return _seq_all_gather(x, mesh)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:  # each rank holds a partial gradient of the full sequence
            return _seq_reduce_scatter(grad, ctx.mesh), None, None
        return seq_slice(grad, ctx.mesh).contiguous(), None, None  # every rank holds the full gradient


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mesh):
        ctx.mesh = mesh
        return _seq_reduce_scatter(x, mesh)

    @staticmethod
    def backward(ctx, grad):
        return _seq_all_gather(grad, ctx.mesh), None


def gather_seq(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """SP's f: (B, T/tp, ...) -> (B, T, ...) all-gather forward, reduce-scatter of the gradient backward."""
    return x if mesh.size("tp") == 1 else _GatherSeq.apply(x, mesh, True)


def gather_seq_replicated(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """All-gather along T forward; backward keeps this rank's chunk of a gradient every rank holds in full
    (the exit of the sequence-parallel region into replicated heads)."""
    return x if mesh.size("tp") == 1 else _GatherSeq.apply(x, mesh, False)


def reduce_scatter_seq(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """SP's g: (B, T, ...) partial sums -> (B, T/tp, ...) chunk of the sum forward, all-gather backward."""
    return x if mesh.size("tp") == 1 else _ReduceScatterSeq.apply(x, mesh)


class SequenceParallelDropout(Dropout):
    """Dropout of a (B, T/tp, ...) shard with this rank's chunk of the full-sequence mask: the counter-hash mask
    of fastllm.ops.dropout over the full (B, T, ...) tensor, its seed drawn from the RNG stream every tp rank
    shares, so the masks (and the RNG state after the call) equal the non-SP layout's."""

    def __init__(self, p: float, mesh: Mesh, kernels: str = "auto"):
        super().__init__(p, kernels)
        self.mesh = mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        full = (x.shape[0], x.shape[1] * self.mesh.size("tp"), *x.shape[2:])  # (B, T, ...)
        ones = torch.ones(full, dtype=x.dtype, device=x.device)
        mask = dropout(ones, self.p, backend=self.backend["dropout"])  # 0 or 1 / (1 - p)
        return x * seq_slice(mask, self.mesh).contiguous()  # (B, T/tp, ...)


def _flag_sequence_parallel(module: nn.Module | None) -> None:
    if module is not None:
        for p in module.parameters():
            p.sequence_parallel = True


def _gather_point(model: nn.Module) -> tuple[nn.Module, bool]:
    """(module whose output leaves the sequence-split region, whether it is GPT's final LayerNorm)."""
    if isinstance(model, GPT):
        return model.ln_f, True
    bert = model if isinstance(model, BertModel) else getattr(model, "bert", None)
    if isinstance(bert, BertModel) and len(bert.layers):
        return bert.layers[-1], False
    raise TensorParallelError(f"sequence_parallel supports GPT and BERT models, got {type(model).__name__}")


def check_sequence_parallel(model: nn.Module) -> None:
    """TensorParallelError when `model` has no sequence-parallel form (no collective)."""
    _gather_point(model)
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadAttention) and m.cross:
            raise TensorParallelError(f"{name}: sequence_parallel does not split cross-attention")
        if isinstance(m, Embeddings) and m.position_kind == "sinusoidal":
            raise TensorParallelError(f"{name}: sequence_parallel does not support sinusoidal positions")


def _apply_sequence_parallel(model: nn.Module, mesh: Mesh) -> None:
    """Hooks the TP-split model into Megatron's sequence-parallel form (see the module docstring)."""
    gather_in = (lambda mod, args: (gather_seq(args[0], mesh), *args[1:]))
    slice_ids = (lambda mod, args: (seq_slice(args[0], mesh, -1), *args[1:]))
    for m in list(model.modules()):
        if isinstance(m, (MultiHeadAttention, MLP)):  # entry f: all-gather; the ColumnParallelLinears skip theirs
            m.register_forward_pre_hook(gather_in)
            column, row = (m.qkv, m.out) if isinstance(m, MultiHeadAttention) else (m.fc_in, m.fc_out)
            column.sequence_parallel = True  # f is the identity: its input was gathered at the module's entry
            row.sequence_parallel = True  # g is a reduce-scatter along T
            if row.bias is not None:  # added after the reduce-scatter, on T shards: partial gradients
                row.bias.sequence_parallel = True
        elif isinstance(m, Embeddings):
            m.word.sequence_parallel = True  # reduce-scatter along T instead of the all-reduce
            for table in (m.position, m.token_type):  # looked up for this rank's positions only
                if table is not None:
                    table.register_forward_pre_hook(slice_ids)
                    _flag_sequence_parallel(table)
            _flag_sequence_parallel(m.norm)
            m.dropout = SequenceParallelDropout(m.dropout.p, mesh, m.dropout.kernels)
        elif isinstance(m, TransformerBlock):
            for norm in (m.norm1, m.norm2, getattr(m, "norm3", None)):
                _flag_sequence_parallel(norm)
            m.drop = SequenceParallelDropout(m.drop.p, mesh, m.drop.kernels)
    point, is_norm = _gather_point(model)
    _flag_sequence_parallel(point if is_norm else None)

    def gather_out(mod, args, out):
        if is_norm:  # ln_f(x) -> y, or ln_f(x, residual) -> (y, x + residual): y leaves the region
            return (gather_seq_replicated(out[0], mesh), *out[1:]) if isinstance(out, tuple) \
                else gather_seq_replicated(out, mesh)
        return dataclasses.replace(out, hidden=gather_seq_replicated(out.hidden, mesh))  # BERT's last BlockOutput

    point.register_forward_hook(gather_out)
    model.tp_sequence_parallel = True


def sync_sequence_parallel_grads(pairs, mesh: Mesh) -> None:
    """Sums over tp the gradients (or gradient pieces) of params flagged `sequence_parallel`; `pairs` are
    (param, grad) in the same order on every tp rank. One all-reduce per dtype; a no-op at tp == 1."""
    if mesh.size("tp") == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, g in pairs:
        if g is not None and getattr(p, "sequence_parallel", False):
            by_dtype.setdefault(g.dtype, []).append(g)
    for grads in by_dtype.values():
        flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), mesh, "tp")
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


# ---------------------------------------------------------------------- validation and application
def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Raises TensorParallelError when `model` cannot be split over tp ranks (no collective: same on all ranks)."""
    if getattr(model, "tp_mesh", None) is not None:
        raise TensorParallelError("apply_tensor_parallel: the model is already tensor-parallel")
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadAttention):
            for what, n in (("heads", m.heads), ("kv_heads", m.kv_heads)):
                if n % tp:
                    raise TensorParallelError(f"{name}: attention {what} = {n} is not divisible by tp = {tp}")
        elif isinstance(m, MLP) and m.fc_out.in_features % tp:
            raise TensorParallelError(f"{name}: MLP intermediate size {m.fc_out.in_features} is not divisible by "
                                      f"tp = {tp}")
        elif isinstance(m, Embeddings) and (m.word.max_norm is not None or m.word.sparse):
            raise TensorParallelError(f"{name}.word: max_norm / sparse embeddings are not supported under tp")


def _split_attention(m: MultiHeadAttention, mesh: Mesh) -> None:
    tp, r, d = mesh.size("tp"), mesh.tp_rank, m.head_dim
    q, kv = m.heads * d, m.kv_heads * d  # canonical row counts of q and of k (= of v)
    q_rows, kv_rows = block(q, tp, r), block(kv, tp, r)
    if m.cross:
        m.q = ColumnParallelLinear(m.q, q_rows, mesh)
        m.kv = ColumnParallelLinear(m.kv, torch.cat([kv_rows, kv + kv_rows]), mesh)  # [k_r; v_r]
    else:
        m.qkv = ColumnParallelLinear(m.qkv, torch.cat([q_rows, q + kv_rows, q + kv + kv_rows]), mesh)  # [q_r; k_r; v_r]
    m.out = RowParallelLinear(m.out, q_rows, mesh)
    m.heads, m.kv_heads = m.heads // tp, m.kv_heads // tp


def _split_mlp(m: MLP, mesh: Mesh) -> None:
    tp, r, inner = mesh.size("tp"), mesh.tp_rank, m.fc_out.in_features
    units = block(inner, tp, r)
    rows = torch.cat([units, inner + units]) if m.activation == "swiglu" else units  # [gate_r; up_r]
    m.fc_in = ColumnParallelLinear(m.fc_in, rows, mesh)
    m.fc_out = RowParallelLinear(m.fc_out, units, mesh)


def _shard_vocab_linear(lin: nn.Linear, mesh: Mesh) -> None:
    """An untied LM head / MLM decoder (V, H): rows (and bias) sharded as the word embedding's; the module is
    only read for .weight / .bias."""
    index = vocab_index(lin.out_features, mesh.size("tp"), mesh.tp_rank)
    lin.weight = _local_param(lin.weight, 0, index)
    if lin.bias is not None:
        lin.bias = _local_param(lin.bias, 0, index)
    lin.out_features = index.numel()


def _split_vocab(model: nn.Module, mesh: Mesh) -> None:
    new: dict[int, VocabParallelEmbedding] = {}
    for m in list(model.modules()):
        if isinstance(m, Embeddings) and isinstance(m.word, nn.Embedding):
            new[id(m.word)] = m.word = VocabParallelEmbedding(m.word, mesh)
    for m in model.modules():
        if isinstance(m, _MLMHead) and m.decoder is None:  # tied: re-point at the new embedding, shard the bias
            m._words = [new.get(id(w), w) for w in m._words]
            m.bias = _local_param(m.bias, 0, vocab_index(m.bias.shape[0], mesh.size("tp"), mesh.tp_rank))
        elif isinstance(m, _MLMHead):
            _shard_vocab_linear(m.decoder, mesh)
        elif isinstance(m, GPT) and m.lm_head is not None:
            _shard_vocab_linear(m.lm_head, mesh)
        for name, child in list(m.named_children()):
            if isinstance(child, VocabLoss):
                setattr(m, name, VocabParallelLoss(mesh, child.label_smoothing))


def apply_tensor_parallel(model: nn.Module, mesh: Mesh, sequence_parallel: bool = False) -> nn.Module:
    """Shards `model` in place over mesh's tp group (see the module docstring); sets model.tp_mesh = mesh.

    sequence_parallel (tp > 1; a no-op at tp == 1): also split the LayerNorm / dropout / residual regions along T
    (GPT and BERT models; sets model.tp_sequence_parallel = True)."""
    check_tensor_parallel(model, mesh.size("tp"))
    if sequence_parallel and mesh.size("tp") > 1:
        check_sequence_parallel(model)
    if mesh.size("tp") > 1:
        for m in list(model.modules()):
            if isinstance(m, MultiHeadAttention):
                _split_attention(m, mesh)
            elif isinstance(m, MLP):
                _split_mlp(m, mesh)
        _split_vocab(model, mesh)
        if sequence_parallel:
            _apply_sequence_parallel(model, mesh)
    model.tp_mesh = mesh
    return model
