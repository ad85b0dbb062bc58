"""The training loop: micro-batch accumulation, AMP, clipping, skipped steps, evaluation, metrics, checkpoints.

Invariants:
- One optimizer step consumes one global batch through a fastllm.parallel ParallelEngine (any dp x tp x pp,
  ZeRO 0-3; a single process is the 1 x 1 x 1 layout): each micro-batch's loss is weighted by its share of the
  global batch, so the reported loss and the gradient are those of one process on the whole batch.
- Non-finite gradients skip the step in every precision (counted in `scaler.skipped`), decided identically on
  every rank; the scheduler advances every step so LRs follow the step number.
- The only randomness used during a step is torch's global RNG (dropout) and per-example data generators, all
  of which are in the checkpoint: a resumed run repeats an uninterrupted one bit for bit on CPU.
- Metrics are summed over dp and pp ranks; only rank 0 writes files.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from fastllm.train.amp import LossScaler, autocast


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


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


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    tokens: int


@dataclass
class Trainer:
    engine: object  # fastllm.parallel.engine.ParallelEngine
    scheduler: object
    scaler: LossScaler
    precision: str = "fp32"
    clip_grad_norm: float = 1.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        self.model.train()
        mbs = [self._to_device(mb) for mb in micro_batches]
        scale = self.scaler.scale if self.scaler.enabled else 1.0
        loss = self.engine.forward_backward(mbs, self.precision, self.device, scale)
        finite, norm = self.engine.step(self.clip_grad_norm, 1.0 / scale)
        self.scaler.update(finite)
        self.scheduler.step()
        mesh = self.engine.mesh
        tokens = sum(int(mb["input_ids"].numel()) for mb in micro_batches) * mesh.dp
        return StepResult(loss, norm, finite, tokens)

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> dict:
        """Held-out metrics summed over `batches` (this dp rank's share) and reduced over ranks."""
        self.model.eval()
        sums = [0.0] * 6  # loss*n, n, correct, nsp_correct, nsp_n, nsp_loss*nsp_n
        for b in batches:
            b = self._to_device(b)
            with autocast(self.precision, self.device):
                out = self.engine.eval_output(b)
            if out is not None:
                for i, v in enumerate(_eval_sums(out, b)):
                    sums[i] += v
        loss_n, n, correct, nsp_c, nsp_n, nsp_l = self.engine.reduce_metrics(sums)
        out = {"loss": loss_n / max(n, 1), "accuracy": correct / max(n, 1), "tokens": int(n)}
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        if nsp_n:
            out.update(nsp_accuracy=nsp_c / nsp_n, nsp_loss=nsp_l / nsp_n)
        return out


def _eval_sums(out, b: dict) -> list[float]:
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
