"""Tiny GPT / BERT training runs through the real Trainer + ParallelEngine, in any layout, for equivalence tests.

Invariants: the model init and the global batches depend only on the seed, never on the layout; rank r of a
layout takes its dp share of each global batch and splits it into micro-batches; `final_params` returns
(tensor, tp_index, tp_dim) pieces keyed by canonical name so the parent can merge tp shards and pp stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastllm.models import GPT, BertConfig, BertForPreTraining, GPTConfig
from fastllm.parallel.engine import Layout, ParallelEngine
from fastllm.parallel.mesh import Mesh
from fastllm.train.amp import LossScaler
from fastllm.train.schedule import WarmupDecay
from fastllm.train.trainer import Trainer

VOCAB = 1001  # odd on purpose: not divisible by tp = 2
SEQ, GLOBAL_BATCH = 16, 8


@dataclass
class Run:
    family: str = "gpt"
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    schedule: str = "1f1b"
    micro: int = 2  # sequences per micro-batch
    steps: int = 10
    heads: int = 4
    layers: int = 4
    sp: bool = False  # Megatron sequence parallelism (tp > 1)


def build_model(family: str, heads: int = 4, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "gpt":
        return GPT(GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=layers, n_head=heads,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    return BertForPreTraining(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=64, max_position_embeddings=32,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def global_batch(family: str, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)  # (B, T)
    if family == "gpt":
        return {"input_ids": ids, "labels": ids.clone()}
    lengths = torch.randint(SEQ // 2, SEQ + 1, (GLOBAL_BATCH,), generator=g)  # (B,)
    mask = torch.arange(SEQ)[None] < lengths[:, None]  # (B, T)
    picked = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) < 0.2) & mask
    return {"input_ids": ids * mask, "attention_mask": mask.long(),
            "token_type_ids": (torch.arange(SEQ)[None] >= lengths[:, None] // 2).long() * mask,
            "labels": torch.where(picked, ids, torch.full_like(ids, -100)),
            "next_sentence_label": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)}


def my_micro_batches(batch: dict, mesh: Mesh, micro: int) -> list[dict]:
    share = GLOBAL_BATCH // mesh.dp
    lo = mesh.dp_rank * share
    return [{k: v[j:j + micro] for k, v in batch.items()} for j in range(lo, lo + share, micro)]


def make_trainer(run: Run, mesh: Mesh) -> Trainer:
    layout = Layout(run.dp, run.tp, run.pp, run.zero, run.schedule, run.sp)
    engine = ParallelEngine(build_model(run.family, run.heads, run.layers), mesh, layout,
                            {"lr": 3e-3, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01})
    sched = WarmupDecay(engine, 3e-3, 2, run.steps)
    return Trainer(engine, sched, LossScaler(False), "fp32", clip_grad_norm=1.0)


def train(trainer: Trainer, run: Run, first: int = 0, steps: int | None = None) -> list[float]:
    mesh = trainer.engine.mesh
    out = []
    for step in range(first, first + (run.steps if steps is None else steps)):
        res = trainer.train_step(my_micro_batches(global_batch(run.family, step), mesh, run.micro))
        out.append((res.loss, res.grad_norm))
    return out


def final_params(trainer: Trainer) -> dict[str, tuple]:
    engine = trainer.engine
    params = engine.dp.named_full_params()
    return {n: (t.detach().clone(), *reversed(engine.tp_meta[n])) if n in engine.tp_meta else (t.detach().clone(),
            None, 0) for n, t in params.items() if n not in engine.tied_copies}


def run_layout(run: Run) -> tuple[list, dict]:
    mesh = Mesh(run.dp, run.pp, run.tp)
    trainer = make_trainer(run, mesh)
    losses = train(trainer, run)
    return losses, final_params(trainer)


def worker_many(rank: int, world: int, runs: list[Run]) -> list:
    return [run_layout(r) for r in runs]


def merge(results: list[dict]) -> dict[str, torch.Tensor]:
    """Canonical tensors from the per-rank pieces of one layout."""
    from fastllm.parallel.checkpoint import _merge
    pieces: dict[str, list] = {}
    for per_rank in results:
        for name, (t, idx, dim) in per_rank.items():
            pieces.setdefault(name, []).append((t, idx, dim))
    return {n: _merge(p) for n, p in pieces.items()}


def worker_errors(rank: int, world: int) -> list[str]:
    """The error each bad layout raises on this rank (every rank must raise, none may hang)."""
    bad = [Run("bert", tp=4, heads=2), Run("gpt", pp=4, layers=2), Run("gpt", dp=2, pp=2, zero=3)]
    messages = []
    for run in bad:
        try:
            make_trainer(run, Mesh(run.dp, run.pp, run.tp))
            messages.append("")
        except ValueError as e:
            messages.append(str(e))
    return messages
