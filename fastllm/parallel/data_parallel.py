"""Data parallelism over the mesh's 'dp' dimension: DDP and ZeRO stages 1-3 behind one engine interface.

`build_data_parallel(model, mesh, zero, optim)` returns an engine; the caller runs forward/backward on
`engine.model` (the model itself, hooks installed: parameter names stay canonical), every backward but the last
of a step under `engine.no_sync()`, then `finish_grads()`, `unscale_`, `grads_finite`, `clip_grad_norm_`,
`step`, `zero_grad`.

Invariants:
- Gradients are SUMMED over dp (the caller weights each micro-batch loss by its share of the global batch).
  Within one step only the last backward may synchronize; a second synchronizing backward raises instead of
  silently reducing the first micro-batches twice. A trainable parameter that got no gradient is reduced as
  zeros (so AdamW still applies weight decay and decays its moments, as on every other rank).
- Optimizer: torch AdamW (foreach=False) with two groups as fastllm/train/optim.py (weight decay for ndim >= 2,
  none otherwise); `param_groups` are the optimizer's groups (an LR scheduler sets 'lr' there).
  zero 0: the optimizer holds the model parameters (fp32) or one fp32 master per parameter (bf16/fp16 models).
  zero >= 1: trainable parameters are laid out back to back in flat buffers ("segments": a gradient bucket of
  ~bucket_mb for zero 1/2, one unit x param group for zero 3), one param group and dtype per segment, padded
  to a multiple of N = dp. Rank r owns elements [r*S, (r+1)*S) of each segment and AdamW steps that shard as one
  tensor. AdamW is elementwise, so a shard's update is exactly the unsharded update of those elements.
- Parameters flagged `tied`/`tied_copy` (shared across pipeline stages) are never bucketed or sharded: their
  grads are all-reduced over dp in finish_grads and their optimizer state stays whole on every rank. Frozen
  parameters (requires_grad False) are left alone (replicated, never reduced or stepped).
- zero 1: grads all-reduced in buckets during backward (as DDP); each rank steps its shard, then every segment
  is all-gathered in place. zero 2: each bucket's grads are reduce-scattered into a persistent shard grad as soon
  as the bucket is complete and the full grads are freed. zero 3: parameters live only as shards; each block of
  a `layers`/`encoder`/`decoder` ModuleList is a unit all-gathered just before its forward (the next unit is
  prefetched), freed after it, re-gathered when the gradient reaches its outputs (the previous unit prefetched)
  and freed again once all its grads are accumulated; its grads are reduce-scattered then. Everything else is the
  root unit, gathered for the whole forward and backward. Freed means the flat buffer's storage is resized to 0;
  autograd's saved views of parameters share that storage and see the re-gathered values.
- Collectives are issued in the same order on every rank: forward gathers follow module order; reductions are
  launched strictly in a fixed segment order (a segment completed early waits for its predecessors).
- zero 3 refuses pp > 1: under an interleaved 1F1B schedule every micro-batch's forward and backward would
  re-gather every unit of the stage (pp x micro-batches times the parameter traffic, without the memory win,
  since several micro-batches are in flight), which is why DeepSpeed also refuses ZeRO-3 with pipelines.
- Mixed precision: for bf16/fp16 models grads stay in the parameter dtype and the optimizer steps fp32 master
  copies (of the shard for zero >= 1), copied back into the parameter dtype after each step. For fp32 models
  the shard the optimizer steps IS the parameter storage (no extra copy).

Memory per rank (`memory_bytes`, Ψ = trainable parameters, N = dp, segment padding and AdamW's 4-byte step
counters aside):
                 bf16/fp16 model (params + grads + master & moments)    fp32 model
  zero 0 (DDP)   2Ψ + 2Ψ + 12Ψ       = 16Ψ                               4Ψ + 4Ψ + 8Ψ       = 16Ψ
  zero 1         2Ψ + 2Ψ + 12Ψ/N     = 4Ψ + 12Ψ/N                        4Ψ + 4Ψ + 8Ψ/N     = 8Ψ + 8Ψ/N
  zero 2         2Ψ + 2Ψ/N + 12Ψ/N   = 2Ψ + 14Ψ/N                        4Ψ + 4Ψ/N + 8Ψ/N   = 4Ψ + 12Ψ/N
  zero 3         2Ψ/N + 2Ψ/N + 12Ψ/N = 16Ψ/N                             4Ψ/N + 4Ψ/N + 8Ψ/N = 16Ψ/N
It counts distinct storages actually allocated at the time of the call (zero 3 between steps: shards only).
Transients are not in the table: zero 2/3 keep full grads while accumulating under no_sync, zero 3 holds one or
two gathered units (plus the root) during forward/backward, fp32 master grads exist only inside step().

`comm_bytes`: bytes this rank sent in dp collectives, by the ring formulas (all-reduce 2(N-1)/N x bytes,
reduce-scatter and all-gather (N-1)/N x bytes of the full tensor); 0 at N = 1.

Limits: zero 3 relies on module hooks, so blocks must be called as modules (activation checkpointing of a block's
forward is fine: the block is gathered before its backward recomputes); under torch.autocast the cast copies of
gathered weights are cached until the autocast region exits, which keeps them alive across units. Gradients of
zero 0/1 are views of the bucket buffers: clear them with engine.zero_grad(), not by setting p.grad = None
mid-step. optimizer_state() adds "master" (the fp32 copy) per parameter for bf16/fp16 models, which
fastllm.parallel.checkpoint saves, so a resumed low-precision model keeps its unrounded masters.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from fastllm.parallel.mesh import Mesh, all_reduce, any_true

LOW_PRECISION = (torch.bfloat16, torch.float16)
UNIT_LISTS = ("layers", "encoder", "decoder")
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def build_data_parallel(model: nn.Module, mesh: Mesh, zero: int, optim: dict, bucket_mb: float = 25.0):
    """The dp engine of `model` for ZeRO stage `zero` (0 = DDP); optim: lr, betas, eps, weight_decay."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    if zero == 3 and mesh.pp > 1:
        raise ValueError(f"ZeRO-3 cannot be combined with pipeline parallelism (pp={mesh.pp}): every micro-batch "
                         "of the 1F1B schedule would re-gather the stage's parameters; use zero <= 2 with pp > 1")
    cls = {0: DDPEngine, 1: ShardedEngine, 2: ShardedEngine, 3: Zero3Engine}[zero]
    return cls(model, mesh, zero, optim, bucket_mb)


# ---------------------------------------------------------------------------------------------- collectives
class _Done:
    """The handle of a collective that already finished (synchronous, or a no-op at dp = 1)."""

    def wait(self) -> bool:
        return True


_DONE = _Done()
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


class _Comm:
    """SUM collectives over 'dp' that count the bytes this rank sends; at dp = 1 they are local copies."""

    def __init__(self, mesh: Mesh):
        self.group, self.n, self.rank, self.sent = mesh.group("dp"), mesh.size("dp"), mesh.dp_rank, 0.0

    def _count(self, factor: float, t: torch.Tensor) -> None:
        self.sent += factor * (self.n - 1) / self.n * t.numel() * t.element_size()

    def all_reduce(self, t: torch.Tensor, async_op: bool = True):
        if self.n == 1:
            return _DONE
        self._count(2.0, t)
        work = dist.all_reduce(t, group=self.group, async_op=async_op)
        return work if async_op else _DONE

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor, async_op: bool = True):
        """out (S,) <- shard `rank` of the dp-sum of full (N*S,)."""
        if self.n == 1:
            out.copy_(full)
            return _DONE
        self._count(1.0, full)
        work = _reduce_scatter(out, full, group=self.group, async_op=async_op)
        return work if async_op else _DONE

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor, async_op: bool = True):
        """full (N*S,) <- the shards (S,) of every rank (shard may be full's own chunk: in place)."""
        if self.n == 1:
            if full.data_ptr() != shard.data_ptr():
                full.copy_(shard)
            return _DONE
        self._count(1.0, full)
        work = _all_gather(full, shard, group=self.group, async_op=async_op)
        return work if async_op else _DONE


# ---------------------------------------------------------------------------------------------- layout
def _group_of(p: torch.Tensor) -> int:
    """Optimizer group as fastllm/train/optim.py: 0 = weight decay (ndim >= 2), 1 = none."""
    return 0 if p.ndim >= 2 else 1


def _is_tied(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tied", False) or getattr(p, "tied_copy", False))


class _Segment:
    """Same-group, same-dtype params back to back in one flat buffer of `padded` = N * S elements.

    Rank r owns [r*S, (r+1)*S). Buffers (None where a stage does not use them): flat (padded,) param dtype, the
    params are views of it; shard (S,) the owned part (a view of flat for zero 1/2, the only copy for zero 3);
    master, the fp32 tensor AdamW steps (aliases shard for fp32 models); grad_flat (padded,) persistent full
    grads with p.grad views of it (zero 0/1); grad_shard (S,) the reduced owned grads (zero 1: a view of grad_flat).
    """

    def __init__(self, group: int, named: list, n: int, rank: int):
        self.group = group
        self.names, self.params = [nm for nm, _ in named], [p for _, p in named]
        self.offsets = list(itertools.accumulate([p.numel() for p in self.params], initial=0))
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.numel = self.offsets[-1]
        self.shard = -(-self.numel // n)
        self.padded, self.lo = self.shard * n, rank * self.shard
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.flat = self.shard_t = self.master = self.grad_flat = self.grad_shard = None
        self.ready: set = set()
        self.complete = self.pending = self.launched = False

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each param's view of a (padded,) buffer, shaped like the param."""
        return [flat[o:o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]

    def pieces(self):
        """(index, start, end) in shard coordinates of each param's part inside this rank's shard."""
        for i, (p, o) in enumerate(zip(self.params, self.offsets)):
            a, b = max(o, self.lo), min(o + p.numel(), self.lo + self.shard)
            if a < b:
                yield i, a - self.lo, b - self.lo

    def new_flat(self, dtype=None) -> torch.Tensor:
        return torch.zeros(self.padded, dtype=dtype or self.dtype, device=self.device)

    def concat(self, tensors: list, dtype=None) -> torch.Tensor:
        """(padded,) buffer from per-param tensors (None = zeros)."""
        flat = self.new_flat(dtype)
        for v, t in zip(self.views(flat), tensors):
            if t is not None:
                v.copy_(t.reshape(v.shape))
        return flat

    def reset(self) -> None:
        self.ready.clear()
        self.complete = self.pending = self.launched = False


def _reattach(seg: _Segment, p: torch.Tensor) -> None:
    """Keeps p.grad a view of seg.grad_flat: a grad autograd allocated afresh (p.grad was reset to None) is
    moved into the bucket, overwriting what the bucket held for p."""
    i = seg.index[id(p)]
    v = seg.grad_flat[seg.offsets[i]:seg.offsets[i + 1]].view_as(p)
    if p.grad.data_ptr() != v.data_ptr():
        v.copy_(p.grad)
        p.grad = v


def _buckets(named: list, bucket_bytes: float, n: int, rank: int) -> list[_Segment]:
    """Reverse registration order, one open bucket per (group, dtype), closed at bucket_bytes; sorted by the
    position of each bucket's last param (when it should complete in backward)."""
    open_, done = {}, []
    for pos, (name, p) in enumerate(reversed(named)):
        key = (_group_of(p), p.dtype)
        entry = open_.setdefault(key, [[], 0])
        entry[0].append((name, p))
        entry[1] += p.numel() * p.element_size()
        if entry[1] >= bucket_bytes:
            done.append((pos, key[0], open_.pop(key)[0]))
    done += [(len(named), key[0], entry[0]) for key, entry in open_.items()]
    done.sort(key=lambda x: x[0])
    return [_Segment(group, items, n, rank) for _, group, items in done]


# ---------------------------------------------------------------------------------------------- base engine
class _Engine:
    """What every stage shares: the optimizer, tied params, the ordered reduction queue, norms and memory."""

    def __init__(self, model: nn.Module, mesh: Mesh, zero: int, optim: dict, bucket_mb: float):
        self.model, self.mesh, self.zero = model, mesh, zero
        self._comm = _Comm(mesh)
        self._no_sync = False
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._tied = [(n, p) for n, p in named if _is_tied(p)]
        self._flat = [(n, p) for n, p in named if not _is_tied(p)]
        self._masters: dict[int, nn.Parameter] = {}  # id(param) -> fp32 master (per-param optimizer entries)
        self.segments: list[_Segment] = self._build_segments(bucket_mb)
        self._order: list[_Segment] = self._launch_order()
        self._next, self._pending = 0, []
        self.optimizer = torch.optim.AdamW(self._opt_groups(optim["weight_decay"]), lr=optim["lr"],
                                           betas=tuple(optim["betas"]), eps=optim["eps"], foreach=False)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in self._flat]

    # -------------------------------------------------------------- hooks for subclasses
    def _build_segments(self, bucket_mb: float) -> list[_Segment]:
        raise NotImplementedError

    def _launch_order(self) -> list[_Segment]:
        return list(self.segments)

    def _per_param(self) -> list[tuple[str, nn.Parameter]]:
        """Params the optimizer holds one by one (DDP: all; otherwise the tied ones)."""
        return self._tied

    def _on_grad(self, p: torch.Tensor) -> None:
        raise NotImplementedError

    def _launch(self, seg: _Segment) -> None:
        raise NotImplementedError

    def _sharded_grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(param, grad piece) pairs whose pieces together tile the dp-sharded gradient once over dp."""
        return []

    def _replicated_grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(param, grad) pairs held whole by every dp rank."""
        return [(p, p.grad) for _, p in self._tied if p.grad is not None]

    def _held_grads(self) -> list[torch.Tensor]:
        """Every gradient tensor this rank holds for its optimizer (unscaled, checked and clipped in place)."""
        return [p.grad for _, p in self._tied if p.grad is not None]

    def grad_pieces(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """After finish_grads: (param, gradient piece) pairs the optimizer steps from, in the same order on every
        rank with the same parameter layout (e.g. tp peers): pieces of this rank's dp shard, then whole grads."""
        return self._sharded_grads() + self._replicated_grads()

    # -------------------------------------------------------------- optimizer
    def _opt_param(self, p: nn.Parameter) -> nn.Parameter:
        """What AdamW steps for a per-param entry: p itself, or its fp32 master for low-precision params."""
        if p.dtype not in LOW_PRECISION:
            return p
        if id(p) not in self._masters:
            self._masters[id(p)] = nn.Parameter(p.detach().to(torch.float32))
        return self._masters[id(p)]

    def _opt_groups(self, weight_decay: float) -> list[dict]:
        groups = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
        for seg in self.segments:
            if seg.master is not None:
                groups[seg.group]["params"].append(seg.master)
        for _, p in self._per_param():
            groups[_group_of(p)]["params"].append(self._opt_param(p))
        return groups

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _per_param_grads_in(self) -> None:
        for _, p in self._per_param():
            q = self._opt_param(p)
            if q is not p:
                q.grad = None if p.grad is None else p.grad.to(torch.float32)

    def _per_param_weights_out(self) -> None:
        with torch.no_grad():
            for _, p in self._per_param():
                q = self._opt_param(p)
                if q is not p:
                    p.copy_(q)
                    q.grad = None

    # -------------------------------------------------------------- reductions
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally and communicate nothing."""
        prev, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = prev

    def _mark_ready(self, seg: _Segment) -> None:
        """Seg's grads are complete: launch it and every ready successor, in the fixed order."""
        if seg.launched or seg.pending:
            raise RuntimeError("a second gradient-synchronizing backward in one step: run every backward but the "
                               "last under engine.no_sync()")
        seg.pending = True
        while self._next < len(self._order) and self._order[self._next].pending:
            self._launch_now(self._order[self._next])

    def _count_ready(self, seg: _Segment, p: torch.Tensor) -> None:
        if seg.launched or seg.pending:
            self._mark_ready(seg)  # raises: a second synchronizing backward
        seg.ready.add(id(p))
        if len(seg.ready) == len(seg.params):
            self._mark_ready(seg)

    def _launch_now(self, seg: _Segment) -> None:
        seg.pending, seg.launched = True, True
        self._next += 1
        self._launch(seg)

    def finish_grads(self) -> None:
        """After the last backward of a step: launch what is left, wait for everything, reduce tied grads."""
        while self._next < len(self._order):
            self._launch_now(self._order[self._next])
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
        for _, p in self._tied:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._comm.all_reduce(p.grad, async_op=False)
        for seg in self.segments:
            seg.reset()
        self._next = 0
        self._after_reduce()

    def _after_reduce(self) -> None:
        pass

    # -------------------------------------------------------------- grad processing
    def unscale_(self, factor: float) -> None:
        for g in self._held_grads():
            g.mul_(factor)

    def grads_finite(self) -> bool:
        """True when every gradient of every rank of the world is finite (the same answer everywhere)."""
        bad = any(not bool(torch.isfinite(g).all()) for g in self._held_grads())
        return not any_true(bad, self.mesh)

    def clip_grad_norm_(self, max_norm: float, counted=lambda p: True) -> float:
        """Global L2 norm of the gradient (each element once; params with counted(p) False excluded), summed over
        dp shards, then over 'tp' and 'pp'; grads are scaled by max_norm / (norm + 1e-6) when that is < 1."""
        dev = self.mesh.device
        sharded = torch.zeros((), dtype=torch.float64, device=dev)
        replicated = torch.zeros((), dtype=torch.float64, device=dev)
        for p, g in self._sharded_grads():
            if counted(p):
                sharded += torch.linalg.vector_norm(g, dtype=torch.float64).to(dev) ** 2
        for p, g in self._replicated_grads():
            if counted(p):
                replicated += torch.linalg.vector_norm(g, dtype=torch.float64).to(dev) ** 2
        total = all_reduce(sharded, self.mesh, "dp") + replicated
        total = all_reduce(all_reduce(total, self.mesh, "tp"), self.mesh, "pp")
        norm = math.sqrt(float(total))
        coef = max_norm / (norm + 1e-6)
        if max_norm > 0 and coef < 1.0:
            for g in self._held_grads():
                g.mul_(coef)
        return norm

    # -------------------------------------------------------------- accounting
    @property
    def comm_bytes(self) -> int:
        return round(self._comm.sent)

    def _extra_params(self) -> list[torch.Tensor]:
        return []

    def _extra_grads(self) -> list[torch.Tensor]:
        return []

    def memory_bytes(self) -> dict:
        """Bytes of distinct storages allocated now: params, grads, optimizer (fp32 masters + moments + steps)."""
        seen: set = set()

        def size(tensors) -> int:
            total = 0
            for t in tensors:
                if t is None:
                    continue
                st = t.untyped_storage()
                if st.nbytes() and st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
            return total

        params = size([p for p in self.model.parameters()] + self._extra_params())
        grads = size([p.grad for p in self.model.parameters()] + self._extra_grads())
        states = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        masters = [q for g in self.optimizer.param_groups for q in g["params"]]
        return {"params": params, "grads": grads, "optimizer": size(masters + states)}

    # -------------------------------------------------------------- checkpoint access (per-param entries)
    def _per_param_state(self, out: dict) -> None:
        for name, p in self._per_param():
            q = self._opt_param(p)
            st = self.optimizer.state.get(q)
            entry = {k: st[k].detach().clone() if st else None for k in STATE_KEYS}
            if q is not p:
                entry["master"] = q.detach().clone()
            out[name] = entry

    def _load_per_param_state(self, params: dict, step: int) -> None:
        for name, p in self._per_param():
            q, entry = self._opt_param(p), params.get(name) or {}
            self.optimizer.state.pop(q, None)
            if entry.get("exp_avg") is not None:
                self.optimizer.state[q] = _adam_state(step, *(entry[k].reshape(q.shape) for k in STATE_KEYS), q)
            if q is not p and entry.get("master") is not None:
                with torch.no_grad():
                    q.copy_(entry["master"].reshape(q.shape))

    def named_full_params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def load_full_params(self, params: dict) -> None:
        _copy_into_model(self.model, params)
        self._refresh_masters()

    def _refresh_masters(self) -> None:
        """Re-derives the fp32 masters from freshly loaded parameters (subclasses add their segment masters)."""
        self._refresh_per_param_masters()

    def _refresh_per_param_masters(self) -> None:
        with torch.no_grad():
            for _, p in self._per_param():
                q = self._opt_param(p)
                if q is not p:
                    q.copy_(p)

    def _step_count(self) -> int:
        steps = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(steps, default=0)

    def _ordered(self, out: dict) -> dict:
        return {n: out[n] for n, _ in self.model.named_parameters() if n in out}


def _adam_state(step: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, like: torch.Tensor) -> dict:
    """torch AdamW's per-param state (single-tensor implementation: a float32 scalar step tensor)."""
    return {"step": torch.tensor(float(step), dtype=torch.float32),
            "exp_avg": exp_avg.to(like.device, torch.float32).clone(),
            "exp_avg_sq": exp_avg_sq.to(like.device, torch.float32).clone()}


# ---------------------------------------------------------------------------------------------- zero 0: DDP
class DDPEngine(_Engine):
    """Bucketed all-reduce overlapped with backward; p.grad are views of the bucket buffers (no copy back)."""

    def _build_segments(self, bucket_mb: float) -> list[_Segment]:
        segs = _buckets(self._flat, bucket_mb * 2 ** 20, 1, 0)
        for seg in segs:
            seg.grad_flat = seg.new_flat()
            self._attach(seg)
        self._seg_of = {id(p): seg for seg in segs for p in seg.params}
        return segs

    def _per_param(self):
        return self._flat + self._tied

    @staticmethod
    def _attach(seg: _Segment) -> None:
        for p, v in zip(seg.params, seg.views(seg.grad_flat)):
            p.grad = v

    def _on_grad(self, p: torch.Tensor) -> None:
        seg = self._seg_of[id(p)]
        _reattach(seg, p)
        if not self._no_sync:
            self._count_ready(seg, p)

    def _launch(self, seg: _Segment) -> None:
        self._pending.append((self._comm.all_reduce(seg.grad_flat), None))

    def _replicated_grads(self):
        return [(p, p.grad) for _, p in self._flat if p.grad is not None] + super()._replicated_grads()

    def _held_grads(self):
        return [seg.grad_flat for seg in self.segments] + super()._held_grads()

    def _extra_grads(self):
        return [seg.grad_flat for seg in self.segments]

    def step(self) -> None:
        self._per_param_grads_in()
        self.optimizer.step()
        self._per_param_weights_out()

    def zero_grad(self) -> None:
        for seg in self.segments:
            seg.grad_flat.zero_()
            self._attach(seg)
        for _, p in self._tied:
            p.grad = None

    def optimizer_state(self) -> dict:
        out: dict = {}
        self._per_param_state(out)
        return {"step": self._step_count(), "params": self._ordered(out)}

    def load_optimizer_state(self, state: dict) -> None:
        self._load_per_param_state(state["params"], int(state["step"]))


def _copy_into_model(model: nn.Module, params: dict, skip=()) -> None:
    """Copies params[name] into every parameter present (names in `skip` are handled by the caller)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params and name not in skip:
                p.copy_(params[name].reshape(p.shape))


# ---------------------------------------------------------------------------------------------- zero 1 / 2
class ShardedEngine(_Engine):
    """ZeRO-1 (all-reduced grads, sharded optimizer) and ZeRO-2 (reduce-scattered grads) over bucket segments."""

    def _build_segments(self, bucket_mb: float) -> list[_Segment]:
        segs = _buckets(self._flat, bucket_mb * 2 ** 20, self._comm.n, self._comm.rank)
        for seg in segs:
            self._flatten_params(seg)
            seg.shard_t = seg.flat[seg.lo:seg.lo + seg.shard]
            seg.master = _master_of(seg.shard_t)
            if self.zero == 1:
                seg.grad_flat = seg.new_flat()
                seg.grad_shard = seg.grad_flat[seg.lo:seg.lo + seg.shard]
                DDPEngine._attach(seg)
            else:
                seg.grad_shard = torch.zeros(seg.shard, dtype=seg.dtype, device=seg.device)
        self._seg_of = {id(p): seg for seg in segs for p in seg.params}
        return segs

    @staticmethod
    def _flatten_params(seg: _Segment) -> None:
        """Moves the params into one flat buffer (same Parameter objects, data now views of seg.flat)."""
        seg.flat = seg.concat([p.detach() for p in seg.params])
        for p, v in zip(seg.params, seg.views(seg.flat)):
            p.data = v

    def _on_grad(self, p: torch.Tensor) -> None:
        seg = self._seg_of[id(p)]
        if self.zero == 1:
            _reattach(seg, p)
        if not self._no_sync:
            self._count_ready(seg, p)

    def _launch(self, seg: _Segment) -> None:
        if self.zero == 1:
            self._pending.append((self._comm.all_reduce(seg.grad_flat), None))
            return
        full = seg.concat([p.grad for p in seg.params])  # (padded,) temporary, freed after the wait
        for p in seg.params:
            p.grad = None
        self._pending.append((self._comm.reduce_scatter(seg.grad_shard, full), full))

    def _sharded_grads(self):
        return [(seg.params[i], seg.grad_shard[a:b]) for seg in self.segments for i, a, b in seg.pieces()]

    def _held_grads(self):
        held = [seg.grad_flat if self.zero == 1 else seg.grad_shard for seg in self.segments]
        return held + super()._held_grads()

    def _extra_params(self):
        return [seg.shard_t for seg in self.segments]

    def _extra_grads(self):
        return [seg.grad_flat if seg.grad_flat is not None else seg.grad_shard for seg in self.segments]

    # -------------------------------------------------------------- step
    def step(self) -> None:
        for seg in self.segments:
            seg.master.grad = seg.grad_shard.to(torch.float32)  # the same tensor for fp32 models
        self._per_param_grads_in()
        self.optimizer.step()
        self._per_param_weights_out()
        with torch.no_grad():
            for seg in self.segments:
                if seg.master.data_ptr() != seg.shard_t.data_ptr():
                    seg.shard_t.copy_(seg.master)
                seg.master.grad = None
        self._publish()

    def _publish(self) -> None:
        """Every rank's updated shards into the full flat buffers (in-place all-gather)."""
        works = [self._comm.all_gather(seg.flat, seg.shard_t) for seg in self.segments]
        for w in works:
            w.wait()

    def zero_grad(self) -> None:
        for seg in self.segments:
            if seg.grad_flat is not None:
                seg.grad_flat.zero_()
                DDPEngine._attach(seg)
            else:
                seg.grad_shard.zero_()
                for p in seg.params:
                    p.grad = None
        for _, p in self._tied:
            p.grad = None

    # -------------------------------------------------------------- checkpoint access
    def _refresh_masters(self) -> None:
        with torch.no_grad():
            for seg in self.segments:
                if seg.master.data_ptr() != seg.shard_t.data_ptr():
                    seg.master.copy_(seg.shard_t)
        self._refresh_per_param_masters()

    def optimizer_state(self) -> dict:
        """Moments (and fp32 masters of low-precision models) gathered whole over dp, in local param shapes."""
        out: dict = {}
        self._per_param_state(out)
        for seg in self.segments:
            st = self.optimizer.state.get(seg.master)
            fulls = {k: self._gather_fp32(seg, st[k]) if st else None for k in STATE_KEYS}
            if seg.master.data_ptr() != seg.shard_t.data_ptr():
                fulls["master"] = self._gather_fp32(seg, seg.master.detach())
            for i, name in enumerate(seg.names):
                out[name] = {k: None if f is None else seg.views(f)[i].clone() for k, f in fulls.items()}
        return {"step": self._step_count(), "params": self._ordered(out)}

    def _gather_fp32(self, seg: _Segment, shard: torch.Tensor) -> torch.Tensor:
        full = seg.new_flat(torch.float32)
        self._comm.all_gather(full, shard.to(torch.float32), async_op=False)
        return full

    def load_optimizer_state(self, state: dict) -> None:
        """Slices this rank's shard out of whole (local-shaped) moments: any dp layout loads any other."""
        params, step = state["params"], int(state["step"])
        self._load_per_param_state(params, step)
        for seg in self.segments:
            entries = [params.get(n) or {} for n in seg.names]
            self.optimizer.state.pop(seg.master, None)
            if all(e.get("exp_avg") is None for e in entries):
                continue
            own = [seg.concat([e.get(k) for e in entries], torch.float32)[seg.lo:seg.lo + seg.shard]
                   for k in STATE_KEYS]
            self.optimizer.state[seg.master] = _adam_state(step, *own, seg.master)
            if seg.master.data_ptr() != seg.shard_t.data_ptr() and all(e.get("master") is not None
                                                                         for e in entries):
                with torch.no_grad():
                    seg.master.copy_(seg.concat([e["master"] for e in entries], torch.float32)
                                     [seg.lo:seg.lo + seg.shard])


def _master_of(shard: torch.Tensor) -> nn.Parameter:
    """The tensor AdamW steps: the shard itself (fp32, shared storage) or an fp32 copy (bf16/fp16)."""
    if shard.dtype in LOW_PRECISION:
        return nn.Parameter(shard.detach().to(torch.float32))
    return nn.Parameter(shard.detach())  # an alias: same storage as the shard


# ---------------------------------------------------------------------------------------------- zero 3
@dataclass(eq=False)
class _Unit:
    """A block (or the root: everything outside blocks) whose params are gathered and freed together."""
    name: str
    module: nn.Module | None
    index: int
    segments: list = field(default_factory=list)
    state: str = "free"  # free | gathering | ready
    works: list = field(default_factory=list)
    backward_done: bool = False


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each child of a top-most `layers`/`encoder`/`decoder` ModuleList, in registration order."""
    blocks: list = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] in UNIT_LISTS and isinstance(mod, nn.ModuleList):
            if any(name.startswith(b + ".") for b, _ in blocks):
                continue
            blocks += [(f"{name}.{i}", blk) for i, blk in enumerate(mod)]
    return blocks


def _owners(model: nn.Module, blocks: list) -> dict[int, int]:
    """id(param) -> block index, or -1 (root) for params registered outside blocks or in several places."""
    owner: dict[int, set] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        idx = next((i for i, (b, _) in enumerate(blocks) if name.startswith(b + ".")), -1)
        owner.setdefault(id(p), set()).add(idx)
    return {k: (next(iter(v)) if len(v) == 1 else -1) for k, v in owner.items()}


def _tensors_in(obj, out: list) -> list:
    """Tensors inside nested tuples, lists, dicts and dataclasses (a block's output)."""
    if torch.is_tensor(obj):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _tensors_in(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors_in(x, out)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _tensors_in(getattr(obj, f.name), out)
    return out


class Zero3Engine(ShardedEngine):
    """Sharded parameters gathered per unit just in time; grads reduce-scattered per unit when complete."""

    def _build_segments(self, bucket_mb: float) -> list[_Segment]:
        blocks = _find_blocks(self.model)
        owner = _owners(self.model, blocks)
        self.root = _Unit("", None, -1)
        self.units = [_Unit(name, mod, i) for i, (name, mod) in enumerate(blocks)]
        n, rank = self._comm.n, self._comm.rank
        for unit in [self.root] + self.units:
            mine = [(nm, p) for nm, p in self._flat if owner[id(p)] == unit.index]
            keys = sorted({(_group_of(p), str(p.dtype)) for _, p in mine})
            for g, dt in keys:
                part = [(nm, p) for nm, p in mine if (_group_of(p), str(p.dtype)) == (g, dt)]
                unit.segments.append(self._shard_segment(_Segment(g, part, n, rank)))
        self._where = {id(p): (seg, u) for u in [self.root] + self.units for seg in u.segments for p in seg.params}
        self._install_hooks()
        return [seg for u in [self.root] + self.units for seg in u.segments]

    def _shard_segment(self, seg: _Segment) -> _Segment:
        """Params become views of seg.flat; the owned shard is copied out and the flat storage freed."""
        self._flatten_params(seg)
        seg.shard_t = seg.flat[seg.lo:seg.lo + seg.shard].clone()
        seg.master = _master_of(seg.shard_t)
        seg.grad_shard = torch.zeros(seg.shard, dtype=seg.dtype, device=seg.device)
        seg.flat.untyped_storage().resize_(0)
        return seg

    def _launch_order(self) -> list[_Segment]:
        """Backward completes units last-to-first; the root (embeddings, heads) completes at the very end."""
        return [seg for u in reversed(self.units) for seg in u.segments] + list(self.root.segments)

    # -------------------------------------------------------------- gather / free
    def _gather(self, unit: _Unit, wait: bool = True) -> None:
        if unit.state == "free" and unit.segments:
            for seg in unit.segments:
                seg.flat.untyped_storage().resize_(seg.padded * seg.flat.element_size())
                unit.works.append(self._comm.all_gather(seg.flat, seg.shard_t))
            unit.state = "gathering"
        if wait and unit.state == "gathering":
            for w in unit.works:
                w.wait()
            unit.works, unit.state = [], "ready"

    def _free(self, unit: _Unit) -> None:
        if unit.state == "free":
            return
        self._gather(unit)  # wait for an in-flight gather first
        for seg in unit.segments:
            seg.flat.untyped_storage().resize_(0)
        unit.state = "free"

    def _free_all(self) -> None:
        for unit in [self.root] + self.units:
            self._free(unit)

    # -------------------------------------------------------------- module hooks
    def _install_hooks(self) -> None:
        self.model.register_forward_pre_hook(lambda m, a: self._before_forward(self.root))
        self.model.register_forward_hook(self._after_root_forward)
        for unit in self.units:
            unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._before_forward(u))
            unit.module.register_forward_hook(lambda m, a, k, out, u=unit: self._after_forward(u, a, k, out),
                                              with_kwargs=True)

    def _before_forward(self, unit: _Unit) -> None:
        unit.backward_done = False
        for seg in unit.segments:
            seg.ready.clear()
            seg.complete = False
        self._gather(unit)
        nxt = unit.index + 1  # the root's index is -1: it prefetches the first block
        if nxt < len(self.units):
            self._gather(self.units[nxt], wait=False)

    def _after_root_forward(self, module, args, out) -> None:
        if not torch.is_grad_enabled():
            self._free(self.root)  # otherwise kept for backward, freed when its grads are complete

    def _after_forward(self, unit: _Unit, args, kwargs, out) -> None:
        if torch.is_grad_enabled():
            inputs = {id(t) for t in _tensors_in((args, kwargs), [])}
            for t in _tensors_in(out, []):
                if t.requires_grad and id(t) not in inputs:
                    t.register_hook(lambda g, u=unit: self._before_backward(u))
        self._free(unit)

    def _before_backward(self, unit: _Unit) -> None:
        if unit.backward_done:
            return
        self._gather(unit)
        prev = unit.index - 1
        if prev >= 0 and not self.units[prev].backward_done:
            self._gather(self.units[prev], wait=False)

    def _on_grad(self, p: torch.Tensor) -> None:
        seg, unit = self._where[id(p)]
        seg.ready.add(id(p))
        if seg.complete or len(seg.ready) < len(seg.params):
            return
        seg.complete = True
        if not self._no_sync:
            self._mark_ready(seg)
        if all(s.complete for s in unit.segments):
            unit.backward_done = True
            self._free(unit)

    def _after_reduce(self) -> None:
        self._free_all()

    # -------------------------------------------------------------- step and accounting
    def _publish(self) -> None:
        self._free_all()  # the next forward gathers the updated shards

    def _extra_grads(self):
        return [seg.grad_shard for seg in self.segments]

    # -------------------------------------------------------------- checkpoint access
    def named_full_params(self) -> dict[str, torch.Tensor]:
        out = {n: p.detach().clone() for n, p in self.model.named_parameters() if id(p) not in self._where}
        for seg in self.segments:
            full = seg.new_flat()
            self._comm.all_gather(full, seg.shard_t, async_op=False)
            out.update({n: v.clone() for n, v in zip(seg.names, seg.views(full))})
        return self._ordered(out)

    def load_full_params(self, params: dict) -> None:
        self._free_all()
        sharded = {n for seg in self.segments for n in seg.names}
        _copy_into_model(self.model, params, skip=sharded)
        with torch.no_grad():
            for seg in self.segments:
                missing = [n for n in seg.names if n not in params]
                if missing:
                    raise KeyError(f"load_full_params: missing parameters {missing}")
                seg.shard_t.copy_(seg.concat([params[n] for n in seg.names])[seg.lo:seg.lo + seg.shard])
        self._refresh_masters()
