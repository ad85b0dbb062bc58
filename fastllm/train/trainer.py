"""The training loop: micro-batch accumulation, AMP, clipping, skipped steps, evaluation, metrics, checkpoints.

Invariants:
- One optimizer step consumes one global batch: this process's micro-batches are accumulated (loss / count),
  under DDP only the last micro-batch synchronizes gradients. Non-finite gradients skip the step in every
  precision (counted in `scaler.skipped`); the scheduler advances every step so LRs follow the step number.
- The only randomness used during a step is torch's global RNG (dropout) and per-example data generators, all
  of which are in the checkpoint: a resumed run repeats an uninterrupted one bit for bit on CPU.
- The parallel engine plugs in as a function: `parallelize(model, world_size) -> model` (DDP by default when
  world_size > 1); nothing here assumes a single process — metrics are all-reduced, only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fastllm.train.amp import LossScaler, autocast


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def default_parallelize(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    if world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Wraps the forward of every block in a `layers` ModuleList with torch.utils.checkpoint; returns the count."""
    from torch.utils.checkpoint import checkpoint
    count = 0
    for name, mod in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(mod, torch.nn.ModuleList):
            for block in mod:
                fwd = block.forward
                block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)
                count += 1
    return count


def _all_reduce(values: list[float], dist_info: DistInfo) -> list[float]:
    if dist_info.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    tokens: int


@dataclass
class Trainer:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: LossScaler
    precision: str = "fp32"
    clip_grad_norm: float = 1.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist_info: DistInfo = field(default_factory=DistInfo)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self.model(**batch).loss

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        self.model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        total, tokens = torch.zeros((), dtype=torch.float64), 0
        for i, mb in enumerate(micro_batches):
            mb = self._to_device(mb)
            sync = i == len(micro_batches) - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss = self._forward_loss(mb) / len(micro_batches)
                self.scaler.scale_loss(loss).backward()
            total += loss.detach().double().cpu()
            tokens += int(mb["input_ids"].numel())
        finite = self.scaler.unscale_and_check(params)
        grad_norm = math.nan
        if finite:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm if self.clip_grad_norm > 0 else math.inf)
            grad_norm = float(norm)
            self.optimizer.step()
        self.scaler.update(finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss_sum, tok = _all_reduce([float(total), float(tokens)], self.dist_info)
        return StepResult(loss_sum / self.dist_info.world_size, grad_norm, finite, int(tok))

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict:
        """Held-out metrics summed over `batches` (this rank's share) and all-reduced."""
        self.model.eval()
        sums = [0.0] * 6  # loss*n, n, correct, nsp_correct, nsp_n, nsp_loss*nsp_n
        for b in batches:
            for i, v in enumerate(self._eval_batch(self._to_device(b))):
                sums[i] += v
        loss_n, n, correct, nsp_c, nsp_n, nsp_l = _all_reduce(sums, self.dist_info)
        out = {"loss": loss_n / max(n, 1), "accuracy": correct / max(n, 1), "tokens": int(n)}
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        if nsp_n:
            out.update(nsp_accuracy=nsp_c / nsp_n, nsp_loss=nsp_l / nsp_n)
        return out

    def _eval_batch(self, b: dict) -> list[float]:
        with autocast(self.precision, self.device):
            out = self.model(**b)
        if "next_sentence_label" in b:
            logits, target = out.prediction_logits, b["labels"]
            loss, nsp_logits = out.mlm_loss, out.seq_relationship_logits
        else:
            logits, target = out.logits[:, :-1], b["labels"][:, 1:]
            loss, nsp_logits = out.loss, None
        keep = target != -100
        n = int(keep.sum())
        correct = int((logits.argmax(-1)[keep] == target[keep]).sum())
        res = [float(loss) * n, n, correct, 0.0, 0.0, 0.0]
        if nsp_logits is not None:
            lab = b["next_sentence_label"]
            res[3:] = [float((nsp_logits.argmax(-1) == lab).sum()), len(lab), float(out.nsp_loss) * len(lab)]
        return res


class Throughput:
    """tokens/s and MFU over the interval since the last call."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.fpt, self.peak = flops_per_token, peak_flops
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> tuple[float, float]:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate, rate * self.fpt / self.peak
