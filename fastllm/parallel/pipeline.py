"""Pipeline parallelism: the model's layers split into mesh.pp contiguous stages, trained with GPipe or 1F1B.

Invariants:
- build_stage(model, mesh) turns the full single-device model (GPT, or a BERT with a head; every rank built it
  from the same seed) into this rank's stage, in place. Stage k keeps layers split_layers(n, pp)[k]: contiguous,
  sizes differing by at most one, the earlier stages taking the extra layers. Layers of other stages become
  parameter-free `Elsewhere` placeholders, so every kept parameter keeps its single-device (canonical) name.
  The first stage keeps the embeddings, the last stage the final norm and every head and loss module (GPT ln_f,
  lm_head; BERT pooler, MLM transform/bias, NSP, ...); a middle stage keeps only its layers.
- A word embedding tied to the output matrix (GPT tie_word_embeddings, BERT's MLM decoder) is owned by the first
  stage (flag `tied`); the last stage keeps a copy Parameter under the same name `...embeddings.word.weight`
  (in an `embeddings` holder with only `word`; flags `tied` and `tied_copy`), made equal to the owner by a
  broadcast at build time. sync_tied_grads sums the two gradients over mesh.group('tied'), so both equal the
  single-device gradient and identical optimizer updates keep owner and copy equal.
- pp > number of layers is a PipelineError raised identically on every rank before any communication.
- Only activations travel between stages: [hidden] (post-LN BERT) or [hidden, residual] (pre-LN GPT: the stream
  is hidden + residual, nn/blocks.py), each (B, T, H) with B, T from the micro-batch's input_ids, which every
  stage has; under sequence parallelism (model.tp_sequence_parallel) each tp rank sends its (B, T/tp, H) shard
  to the same tp rank of the next stage (T % tp != 0: the TensorParallelError, on every rank before any send).
  Their dtypes are sent once per call in a small header (under autocast a GPT stage sends a bf16
  delta and an fp32 residual). Gradients travel back with the same shapes and dtypes. p2p ops are
  batch_isend_irecv to the global ranks of mesh.peers('pp') over mesh.group('pp').
- The last stage runs the model's own forward with its encoder (GPT.body / the BERT head's encode) replaced by
  this stage's layers, so losses, logits and output fields are exactly the single-device model's. Other stages
  call their embeddings and layers directly: hooks on the root module fire on the last stage only.
- run_schedule: 'gpipe' runs all forwards, then all backwards (m micro-batches in flight); '1f1b' is Megatron's
  non-interleaved schedule: stage k runs min(pp - k - 1, m) warm-up forwards, then one forward + one backward
  per step, then the remaining backwards, so at most pp - k <= pp micro-batches are in flight. Every backward
  but the last runs inside no_sync(). It returns the sum of loss_fn values on the last stage, 0.0 elsewhere.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastllm.models.bert import BertForMultipleChoice, _BertWithHead, _padding_mask
from fastllm.models.gpt import GPT
from fastllm.models.outputs import BaseModelOutput
from fastllm.nn._kernels import apply_norm
from fastllm.parallel.mesh import Mesh, all_reduce

SCHEDULES = ("1f1b", "gpipe")
_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # header code = index


class PipelineError(ValueError):
    """A pipeline layout or call that cannot run (names the sizes or values involved)."""


@dataclass(frozen=True)
class StageInfo:
    rank: int  # pipeline rank of this stage
    size: int  # pp
    layers: range  # indices of the layers this stage runs

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


@dataclass
class PipelineStats:
    """Per-rank seconds accumulated over run_schedule calls; busy = compute, the rest is waiting (the bubble)."""
    forward_s: float = 0.0
    backward_s: float = 0.0
    comm_s: float = 0.0  # time inside send/recv (waiting for a neighbour included)
    total_s: float = 0.0
    steps: int = 0
    max_in_flight: int = 0  # micro-batches whose activations were held at once

    @property
    def busy_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_s / self.total_s if self.total_s > 0 else 0.0


class Elsewhere(nn.Module):
    """Stands in for a layer that lives on another pipeline stage (no parameters, never called)."""

    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"this layer lives on pipeline stage {self.stage}")

    def extra_repr(self) -> str:
        return f"stage={self.stage}"


class TiedHolder(nn.Module):
    """The last stage's `embeddings`: only `word`, whose weight is the copy of the first stage's tied weight."""

    def __init__(self, word: nn.Module):
        super().__init__()
        self.word = word


# ---------------------------------------------------------------------- building a stage
def split_layers(n_layers: int, pp: int) -> list[range]:
    """pp contiguous ranges covering range(n_layers); the first n_layers % pp stages get one extra layer."""
    if pp > n_layers:
        raise PipelineError(f"pipeline size pp={pp} exceeds the model's {n_layers} layers "
                            f"(every stage needs at least one layer)")
    base, extra = divmod(n_layers, pp)
    bounds = [0]
    for k in range(pp):
        bounds.append(bounds[-1] + base + (1 if k < extra else 0))
    return [range(bounds[k], bounds[k + 1]) for k in range(pp)]


def _encoder(model: nn.Module) -> nn.Module:
    """The module holding `embeddings` and `layers`; a PipelineError for models without a pipeline form."""
    if isinstance(model, GPT):
        return model
    if isinstance(model, _BertWithHead) and not isinstance(model, BertForMultipleChoice):
        return model.bert
    raise PipelineError(f"build_stage supports GPT and BERT models with a head (not multiple choice), "
                        f"got {type(model).__name__}")


def _tied_embedding(model: nn.Module) -> nn.Module | None:
    """The word-embedding module whose weight is also the output matrix, or None."""
    if isinstance(model, GPT):
        return model.embeddings.word if model.lm_head is None else None
    mlm = getattr(model, "mlm", None)
    return model.bert.embeddings.word if mlm is not None and mlm.decoder is None else None


def _head_owners(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every module only the last stage runs."""
    if isinstance(model, GPT):
        return [(model, "ln_f"), (model, "lm_head"), (model, "loss_fn")]
    heads = [(model, name) for name, m in model.named_children() if m is not model.bert]
    return heads + [(model.bert, "pooler")]


def build_stage(model: nn.Module, mesh: Mesh) -> nn.Module:
    """This rank's pipeline stage of `model`, built in place (pp == 1: the model, unchanged)."""
    if mesh.pp == 1:
        return model
    enc = _encoder(model)
    info = StageInfo(mesh.pp_rank, mesh.pp, split_layers(len(enc.layers), mesh.pp)[mesh.pp_rank])
    owner = {i: k for k, r in enumerate(split_layers(len(enc.layers), mesh.pp)) for i in r}
    for i in range(len(enc.layers)):
        if i not in info.layers:
            enc.layers[i] = Elsewhere(owner[i])
    tied = _tied_embedding(model)
    if not info.first:
        enc.embeddings = TiedHolder(tied) if info.last and tied is not None else None
    if not info.last:
        for parent, name in _head_owners(model):
            setattr(parent, name, None)
    if tied is not None and (info.first or info.last):
        _mark_and_share_tied(tied.weight, info, mesh)
    model.pp_stage = info
    return model


def _mark_and_share_tied(p: nn.Parameter, info: StageInfo, mesh: Mesh) -> None:
    """Flags the owner / copy and copies the owner's value into the copy (a broadcast over the tied group)."""
    p.tied = True
    if not info.first:
        p.tied_copy = True
    with torch.no_grad():
        buf = p.detach().to(mesh.device).contiguous()  # (V, H)
        dist.broadcast(buf, src=mesh.peers("pp")[0], group=mesh.group("tied"))
        p.copy_(buf)


def tied_parameters(stage: nn.Module) -> list[nn.Parameter]:
    """The stage's parameters flagged `tied` (owner or copy), in module order."""
    return [p for p in stage.parameters() if getattr(p, "tied", False)]


def sync_tied_grads(stage: nn.Module, mesh: Mesh) -> None:
    """Sums the gradients of tied weights over the first and last stage (a missing grad counts as zero)."""
    if mesh.pp == 1:
        return
    for p in tied_parameters(stage):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad, mesh, "tied")


# ---------------------------------------------------------------------- one stage's compute
def _unwrap(stage: nn.Module) -> nn.Module:
    """The stage module under data-parallel wrappers that expose it as `.module`."""
    m = stage
    while not hasattr(m, "pp_stage") and isinstance(getattr(m, "module", None), nn.Module):
        m = m.module
    return m


def _forward_args(model: nn.Module, mb: dict) -> dict:
    names = inspect.signature(type(model).forward).parameters
    return {k: v for k, v in mb.items() if k in names}


@contextlib.contextmanager
def _replaced(model: nn.Module, method: str, fn):
    """model.<method> is `fn` inside the block (an instance attribute shadowing the class method)."""
    object.__setattr__(model, method, fn)
    try:
        yield
    finally:
        object.__delattr__(model, method)


def _gpt_layers(model: GPT, layers: range, mb: dict, carry: list | None) -> list:
    """GPT.body's loop over `layers`: [delta (B, T, H), residual (B, T, H)] (residual None before layer 0)."""
    ids = mb["input_ids"]  # (B, T)
    mask = model._mask(mb.get("attention_mask"), ids, 0)  # (B, T) bool or None
    pos = model._positions(ids, mb.get("position_ids"), 0) if model.rotary is not None else None
    x, res = carry if carry is not None else (model.embeddings(ids, None, mb.get("position_ids")), None)
    for i in layers:
        o = model.layers[i](x, res, key_padding_mask=mask, causal=True, positions=pos)
        x, res = o.hidden, o.residual  # (B, T, H) each
    return [x, res]


def _gpt_head(model: GPT, mb: dict, carry: list):
    y = apply_norm(model.ln_f, carry[0], carry[1])[0]  # (B, T, H)
    with _replaced(model, "body", lambda *a, **k: (y, None, None, None)):
        return model(**_forward_args(model, mb))


def _bert_layers(model: _BertWithHead, layers: range, mb: dict, carry: list | None) -> list:
    bert, ids = model.bert, mb["input_ids"]  # (B, T)
    mask = _padding_mask(mb.get("attention_mask"), ids)  # (B, T) bool or None
    x = carry[0] if carry is not None else bert.embeddings(ids, mb.get("token_type_ids"), mb.get("position_ids"))
    for i in layers:
        x = bert.layers[i](x, key_padding_mask=mask).hidden  # (B, T, H)
    return [x]


def _bert_head(model: _BertWithHead, mb: dict, carry: list):
    x = carry[0]  # (B, T, H)
    pooled = model.bert.pooler(x) if model.bert.pooler is not None else None  # (B, H)
    with _replaced(model, "encode", lambda *a, **k: BaseModelOutput(x, pooled)):
        return model(**_forward_args(model, mb))


# ---------------------------------------------------------------------- point-to-point traffic
class _Link:
    """This stage's traffic with its pipeline neighbours during one call; dtypes travel once, in a header."""

    def __init__(self, mesh: Mesh, count: int):
        peers, k = mesh.peers("pp"), mesh.pp_rank
        self.prev = peers[k - 1] if k > 0 else None
        self.next = peers[k + 1] if k < mesh.pp - 1 else None
        self.group, self.device, self.count = mesh.group("pp"), mesh.device, count
        self.recv_dtypes: list | None = None  # of the activations from prev (learned from its header)
        self.sent_dtypes: list | None = None  # of the activations sent to next (their grads come back so)

    def _header_out(self, acts: list) -> None:
        if self.sent_dtypes is None:
            self.sent_dtypes = [a.dtype for a in acts]
            codes = torch.tensor([_WIRE_DTYPES.index(d) for d in self.sent_dtypes], device=self.device)
            dist.send(codes, self.next, group=self.group)

    def _header_in(self) -> None:
        if self.recv_dtypes is None:
            codes = torch.empty(self.count, dtype=torch.long, device=self.device)
            dist.recv(codes, self.prev, group=self.group)
            self.recv_dtypes = [_WIRE_DTYPES[int(c)] for c in codes.tolist()]

    def exchange(self, shape, send_fwd=None, send_bwd=None, recv_fwd=False, recv_bwd=False):
        """Posts the given sends and receives together and waits for all: (activations, grads) received."""
        ops, acts, grads = [], None, None
        if send_fwd is not None and self.next is not None:
            self._header_out(send_fwd)
            ops += [dist.P2POp(dist.isend, t.detach().contiguous(), self.next, self.group) for t in send_fwd]
        if send_bwd is not None and self.prev is not None:
            ops += [dist.P2POp(dist.isend, g.contiguous(), self.prev, self.group) for g in send_bwd]
        if recv_fwd and self.prev is not None:
            self._header_in()
            acts = [torch.empty(shape, dtype=d, device=self.device) for d in self.recv_dtypes]  # (B, T, H)
            ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in acts]
        if recv_bwd and self.next is not None:
            grads = [torch.empty(shape, dtype=d, device=self.device) for d in self.sent_dtypes]  # (B, T, H)
            ops += [dist.P2POp(dist.irecv, t, self.next, self.group) for t in grads]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return acts, grads


# ---------------------------------------------------------------------- forward / backward steps
class _Runner:
    """One call's forward and backward steps of a stage, with the traffic and the timing around them."""

    def __init__(self, stage: nn.Module, mesh: Mesh, loss_fn=None, no_sync=contextlib.nullcontext,
                 n_micro: int = 1, stats: PipelineStats | None = None):
        self.call, self.model = stage, _unwrap(stage)
        n = len(_encoder(self.model).layers) if mesh.pp > 1 else 0
        self.info = getattr(self.model, "pp_stage", StageInfo(0, 1, range(n)))
        if self.info.size != mesh.pp:
            raise PipelineError(f"the stage was built for pp={self.info.size} but the mesh has pp={mesh.pp} "
                                f"(build it with build_stage(model, mesh))")
        gpt = isinstance(self.model, GPT)
        self.layers_fn, self.head_fn = (_gpt_layers, _gpt_head) if gpt else (_bert_layers, _bert_head)
        self.hidden = (self.model.config.n_embd if gpt else self.model.config.hidden_size) if mesh.pp > 1 else 0
        self.link = _Link(mesh, 2 if gpt else 1)
        self.mesh, self.seq_split = mesh, getattr(self.model, "tp_sequence_parallel", False) and mesh.tp > 1
        self.loss_fn, self.no_sync, self.n_micro = loss_fn, no_sync, n_micro
        self.stats, self.total, self.backwards = stats or PipelineStats(), 0.0, 0
        self.in_flight = 0

    def shape(self, mb: dict) -> tuple:
        b, t = mb["input_ids"].shape
        if self.seq_split:
            from fastllm.parallel.tensor_parallel import check_sequence_length
            check_sequence_length(t, self.mesh)
            return (b, t // self.mesh.tp, self.hidden)  # (B, T/tp, H): this tp rank's positions
        return (b, t, self.hidden)  # (B, T, H)

    def _timed_exchange(self, mb: dict, **kw):
        t0 = time.perf_counter()
        out = self.link.exchange(self.shape(mb), **kw)
        self.stats.comm_s += time.perf_counter() - t0
        return out

    def recv_forward(self, mb: dict, send_bwd=None):
        acts = self._timed_exchange(mb, send_bwd=send_bwd, recv_fwd=True)[0]
        return None if acts is None else [a.requires_grad_(torch.is_grad_enabled()) for a in acts]

    def send_forward(self, mb: dict, outputs, recv_bwd_for: dict | None = None):
        """Sends this stage's outputs; with recv_bwd_for, also receives the grads of that micro-batch."""
        send = outputs if not self.info.last else None
        shape_mb = recv_bwd_for if recv_bwd_for is not None else mb
        return self._timed_exchange(shape_mb, send_fwd=send, recv_bwd=recv_bwd_for is not None)[1]

    def recv_backward(self, mb: dict):
        return self._timed_exchange(mb, recv_bwd=True)[1]

    def send_backward(self, mb: dict, grads) -> None:
        self._timed_exchange(mb, send_bwd=grads)

    def compute(self, mb: dict, inputs):
        """The stage's outputs: activations to send, or on the last stage the model output."""
        if self.info.size == 1:
            return self.call(**mb)
        carry = self.layers_fn(self.model, self.info.layers, mb, inputs)
        return self.head_fn(self.model, mb, carry) if self.info.last else carry

    def forward(self, mb: dict, inputs):
        """compute + loss_fn on the last stage (its value summed into self.total): what backward starts from."""
        t0 = time.perf_counter()
        out = self.compute(mb, inputs)
        if self.info.last:
            out = self.loss_fn(out, mb)  # scalar
            self.total += float(out.detach())
        self.stats.forward_s += time.perf_counter() - t0
        self.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)
        return out

    def backward(self, inputs, outputs, grads):
        """Backprops one micro-batch (inside no_sync but for the call's last backward): grads of its inputs."""
        t0 = time.perf_counter()
        last = self.backwards == self.n_micro - 1
        with contextlib.nullcontext() if last else self.no_sync():
            if self.info.last:
                outputs.backward()
            else:
                pairs = [(o, g) for o, g in zip(outputs, grads) if o is not None and o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        self.backwards += 1
        self.in_flight -= 1
        self.stats.backward_s += time.perf_counter() - t0
        if inputs is None:
            return None
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]


# ---------------------------------------------------------------------- schedules
def _gpipe(r: _Runner, mbs: list[dict]) -> None:
    held = deque()
    for mb in mbs:
        inputs = r.recv_forward(mb)
        outputs = r.forward(mb, inputs)
        r.send_forward(mb, outputs)
        held.append((mb, inputs, outputs))
    while held:
        mb, inputs, outputs = held.popleft()
        grads = r.recv_backward(mb)
        r.send_backward(mb, r.backward(inputs, outputs, grads))


def _one_f_one_b(r: _Runner, mbs: list[dict]) -> None:
    m = len(mbs)
    warmup = min(r.info.size - r.info.rank - 1, m)
    held = deque()
    for mb in mbs[:warmup]:
        inputs = r.recv_forward(mb)
        outputs = r.forward(mb, inputs)
        r.send_forward(mb, outputs)
        held.append((mb, inputs, outputs))
    inputs = r.recv_forward(mbs[warmup]) if warmup < m else None
    for i in range(warmup, m):
        outputs = r.forward(mbs[i], inputs)
        held.append((mbs[i], inputs, outputs))
        old_mb, old_in, old_out = held.popleft()
        grads = r.send_forward(mbs[i], outputs, recv_bwd_for=old_mb)
        in_grads = r.backward(old_in, old_out, grads)
        if i == m - 1:
            r.send_backward(old_mb, in_grads)
        else:
            inputs = r.recv_forward(mbs[i + 1], send_bwd=in_grads)
    while held:
        mb, inputs, outputs = held.popleft()
        grads = r.recv_backward(mb)
        r.send_backward(mb, r.backward(inputs, outputs, grads))


def run_schedule(stage: nn.Module, micro_batches: list[dict], loss_fn, mesh: Mesh, schedule: str = "1f1b",
                 no_sync=contextlib.nullcontext, stats: PipelineStats | None = None) -> float:
    """Forward + backward of every micro-batch through the pipeline; the summed loss_fn values (last stage)."""
    if schedule not in SCHEDULES:
        raise PipelineError(f"pipeline schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not micro_batches:
        raise PipelineError("run_schedule needs at least one micro-batch, got 0")
    t0 = time.perf_counter()
    r = _Runner(stage, mesh, loss_fn, no_sync, len(micro_batches), stats)
    (_gpipe if schedule == "gpipe" else _one_f_one_b)(r, micro_batches)
    r.stats.total_s += time.perf_counter() - t0
    r.stats.steps += 1
    return r.total if r.info.last else 0.0


@torch.no_grad()
def pipeline_forward(stage: nn.Module, batch: dict, mesh: Mesh):
    """The model output of `batch` (one micro-batch, no grad) on the last stage; None on the others."""
    r = _Runner(stage, mesh)
    inputs = r.recv_forward(batch)
    out = r.compute(batch, inputs)
    if r.info.last:
        return out
    r.send_forward(batch, out)
    return None
