"""The parallel engine as one object: tensor parallel, then the pipeline stage, then data parallel (DDP/ZeRO).

Invariants:
- Built from a full single-device model that every rank constructed from the same seed: `apply_tensor_parallel`
  slices it (tp > 1; with layout.sequence_parallel also along the sequence in the LayerNorm / dropout regions,
  so pipeline stages exchange (B, T/tp, H) activations), `build_stage` keeps this rank's layers (pp > 1),
  `build_data_parallel` wraps the result (always; at dp = 1 its collectives are no-ops). Parameter names stay
  canonical throughout.
- Global-batch weighting: the loss of micro-batch i is weighted by its share of the global batch's targets
  (LM/MLM tokens with a label, NSP sequences), counted on the host from the labels and summed over dp before any
  forward. Gradients are summed over dp, so every layout computes the gradient of the single-process loss of
  the same global batch, and the reported loss is that loss (the micro-batch sums, all-reduced over dp and pp).
- One optimizer step: forward/backward of every micro-batch (the pipeline schedule when pp > 1; otherwise a
  loop whose last backward alone communicates), dp reduction, tied-weight gradient sync across stages, the tp sum
  of sequence-parallel params' partial gradients, fp16 unscale, a finite check agreed by every rank, global-norm
  clipping (each gradient element counted once: tp-replicated params, sequence-parallel ones included, on tp rank
  0 only, tied copies never), the step, zero_grad.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from fastllm.parallel.mesh import Mesh, all_reduce
from fastllm.train.amp import autocast


@dataclass
class Layout:
    """dp x pp x tp, the ZeRO stage, the pipeline schedule and Megatron sequence parallelism (tp > 1; ignored at
    tp == 1) (validated by fastllm.train.config)."""
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    pipeline_schedule: str = "1f1b"
    sequence_parallel: bool = False


def _is_causal_lm(model: torch.nn.Module) -> bool:
    from fastllm.models import GPTConfig
    return isinstance(getattr(model, "config", None), GPTConfig)


def _targets(mb: dict, causal: bool) -> tuple[int, int]:
    """(labelled tokens, NSP sequences) of one micro-batch, counted as the model's losses count them."""
    labels = mb.get("labels")
    if labels is None:
        return 0, 0
    tokens = int((labels[:, 1:] != -100).sum()) if causal else int((labels != -100).sum())
    nsp = int(mb["next_sentence_label"].numel()) if "next_sentence_label" in mb else 0
    return tokens, nsp


def counted(mesh: Mesh):
    """The clipping predicate: count tp-replicated params (sequence-parallel ones too: their grads are summed over
    tp before clipping) on tp rank 0 only and never a tied copy."""
    def keep(p) -> bool:
        if getattr(p, "tied_copy", False):
            return False
        return hasattr(p, "tp_index") or mesh.tp_rank == 0
    return keep


class ParallelEngine:
    def __init__(self, model: torch.nn.Module, mesh: Mesh, layout: Layout, optim: dict):
        self.mesh, self.layout, self.config = mesh, layout, model.config
        self.causal = _is_causal_lm(model)
        if mesh.tp > 1:
            from fastllm.parallel.tensor_parallel import apply_tensor_parallel
            apply_tensor_parallel(model, mesh, layout.sequence_parallel)
        if mesh.pp > 1:
            from fastllm.parallel.pipeline import build_stage
            model = build_stage(model, mesh)
        named = list(model.named_parameters())
        self.param_names = [n for n, _ in named]
        self.tp_meta = {n: (p.tp_dim, p.tp_index) for n, p in named if hasattr(p, "tp_index")}
        self.tied_copies = {n for n, p in named if getattr(p, "tied_copy", False)}
        from fastllm.parallel.data_parallel import build_data_parallel
        self.dp = build_data_parallel(model, mesh, layout.zero, optim)
        self.model = self.dp.model

    @property
    def param_groups(self) -> list[dict]:
        return self.dp.param_groups

    # ------------------------------------------------------------------ one step
    def _weights(self, micro_batches: list[dict]) -> list[tuple[float, float]]:
        counts = [_targets(mb, self.causal) for mb in micro_batches]
        total = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)], dtype=torch.float64)
        tok, nsp = all_reduce(total.to(self.mesh.device), self.mesh, "dp").tolist()
        return [(t / tok if tok else 0.0, n / nsp if nsp else 0.0) for t, n in counts]

    @staticmethod
    def weighted_loss(out, weights: tuple[float, float]) -> torch.Tensor:
        """The micro-batch's term of the global-batch loss."""
        w_tok, w_nsp = weights
        if getattr(out, "nsp_loss", None) is not None:
            mlm = out.mlm_loss * w_tok if w_tok > 0 else out.nsp_loss * 0.0
            return mlm + out.nsp_loss * w_nsp
        return out.loss * w_tok

    def forward_backward(self, micro_batches: list[dict], precision: str, device, scale: float = 1.0) -> float:
        """Runs forward and backward of this rank's micro-batches; returns the global-batch loss (every rank)."""
        weights = {id(mb): w for mb, w in zip(micro_batches, self._weights(micro_batches))}

        def loss_fn(out, mb):
            return self.weighted_loss(out, weights[id(mb)]) * scale

        with autocast(precision, device):
            total = self._run(micro_batches, loss_fn)
        t = torch.tensor([total / scale], dtype=torch.float64, device=self.mesh.device)
        return float(all_reduce(all_reduce(t, self.mesh, "dp"), self.mesh, "pp"))

    def _run(self, micro_batches: list[dict], loss_fn) -> float:
        if self.mesh.pp > 1:
            from fastllm.parallel.pipeline import run_schedule
            return run_schedule(self.model, micro_batches, loss_fn, self.mesh, self.layout.pipeline_schedule,
                                no_sync=self.dp.no_sync)
        total = 0.0
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.dp.no_sync():
                loss = loss_fn(self.model(**mb), mb)
                loss.backward()
            total += float(loss.detach())
        return total

    def finish_grads(self) -> None:
        self.dp.finish_grads()
        if self.mesh.pp > 1:
            from fastllm.parallel.pipeline import sync_tied_grads
            sync_tied_grads(self.model, self.mesh)
        if self.layout.sequence_parallel and self.mesh.tp > 1:  # partial grads of LayerNorms etc. -> full
            from fastllm.parallel.tensor_parallel import sync_sequence_parallel_grads
            sync_sequence_parallel_grads(self.dp.grad_pieces(), self.mesh)

    def step(self, clip: float, inv_scale: float = 1.0) -> tuple[bool, float]:
        """After forward_backward: reduce, unscale, check, clip, step. Returns (finite, global grad norm)."""
        self.finish_grads()
        if inv_scale != 1.0:
            self.dp.unscale_(inv_scale)
        finite, norm = self.dp.grads_finite(), math.nan
        if finite:
            norm = float(self.dp.clip_grad_norm_(clip if clip > 0 else 0.0, counted(self.mesh)))
            self.dp.step()
        self.dp.zero_grad()
        return finite, norm

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_output(self, batch: dict):
        """The model output of a batch on the last pipeline stage (None on others); full-vocabulary logits."""
        if self.mesh.pp > 1:
            from fastllm.parallel.pipeline import pipeline_forward
            out = pipeline_forward(self.model, batch, self.mesh)
        else:
            out = self.model(**batch)
        if out is not None and self.mesh.tp > 1:
            from fastllm.parallel.tensor_parallel import gather_vocab_logits
            vocab = self.config.vocab_size
            for name in ("logits", "prediction_logits"):
                if getattr(out, name, None) is not None:
                    setattr(out, name, gather_vocab_logits(getattr(out, name), vocab, self.mesh))
        return out

    def reduce_metrics(self, values: list[float]) -> list[float]:
        """Sums per-rank metric sums over dp and pp (tp ranks hold identical copies)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.mesh.device)
        return all_reduce(all_reduce(t, self.mesh, "dp"), self.mesh, "pp").tolist()
