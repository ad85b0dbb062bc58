"""torch.compile with the default inductor backend on CPU: every model trains in one graph (fullgraph=True)
and its loss and gradients equal eager, in fp32 and under bf16 autocast.

Compiling is the slow part (each case generates and builds C++ kernels: ~10-50 s cold on 2 busy cores), so
the models are tiny (1-2 layers of width 32, 6-17 tokens) and each case compiles once. fullgraph=True makes any
graph break an error, so passing proves "one graph" for forward and backward; set_stance("fail_on_recompile")
proves that later batches reuse it. Dropout is off where results are compared (inductor draws other random
numbers than eager); test_dropout_traces_in_one_graph checks the dropout paths (hidden and attention dropout)
with aot_eager, which traces forward and backward like inductor but builds no kernels.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fastllm.models import GPT, BertForPreTraining, BertForSequenceClassification, Transformer
from tests.models.helpers import mlm_batch, tiny_bert, tiny_gpt, tiny_transformer

NO_DROP_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
NO_DROP_GPT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _bert_pretraining(dropout: bool):
    cfg = tiny_bert(**({} if dropout else NO_DROP_BERT))
    return BertForPreTraining(cfg), mlm_batch(cfg)  # MLM labels on ~30% of tokens + NSP labels


def _bert_seq(dropout: bool):
    cfg = tiny_bert(**({} if dropout else NO_DROP_BERT))
    b = mlm_batch(cfg)
    batch = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    return BertForSequenceClassification(cfg), {**batch, "labels": torch.tensor([0, 2, 1])}


def _gpt(dropout: bool):
    cfg = tiny_gpt(**({} if dropout else NO_DROP_GPT))
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, 4] = -100
    mask = torch.ones(2, 17, dtype=torch.long)
    return GPT(cfg), {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _transformer(dropout: bool):
    # 1 encoder + 1 decoder layer: the 2 + 2 of the other tests compiles ~20 s longer (cold, 2 cores) and adds
    # no code path here (stacking same-shaped layers is covered by the 2-layer BERT and GPT cases).
    kw = {"attention_dropout": 0.1} if dropout else {"dropout": 0.0}
    cfg = tiny_transformer(num_encoder_layers=1, num_decoder_layers=1, **kw)
    g = torch.Generator().manual_seed(4)
    src = torch.randint(3, cfg.src_vocab_size, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 8:] = 0
    labels = torch.randint(3, cfg.tgt_vocab_size, (3, 9), generator=g)
    labels[1, 7:] = -100
    return Transformer(cfg), {"input_ids": src, "attention_mask": mask, "labels": labels}


MODELS = {"bert_pretraining": _bert_pretraining, "bert_seq": _bert_seq, "gpt": _gpt,
          "transformer": _transformer}


def _step(model, fn, batch, bf16: bool):
    """(loss, {name: grad}) of one forward + backward of fn(**batch), from zero gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_grads_close(got: dict, want: dict, rel: float) -> None:
    """Per parameter: ||got - want|| <= rel * ||want|| (a zero gradient must stay zero)."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert got[name] is not None, name
        err, scale = (got[name] - w).norm().item(), w.norm().item()
        assert err <= rel * scale, f"{name}: |compiled - eager| = {err:.3g}, |eager| = {scale:.3g}"


def _shorter(batch: dict, t: int) -> dict:
    """The batch cut to t positions (fresh contiguous tensors, like a new batch from a loader)."""
    return {k: v[:, :t].clone() if v.dim() == 2 else v for k, v in batch.items()}


def _check(name: str, bf16: bool, lengths: tuple, loss_rtol: float, grad_rel: float, **compile_kw):
    """Compiles the model once; for each length (None: the whole batch) compiled == eager. After the first
    call any recompilation is an error."""
    torch.manual_seed(0)
    model, batch = MODELS[name](dropout=False)
    model.train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, **compile_kw)  # inductor; any graph break is an error
    for i, t in enumerate(lengths):
        b = batch if t is None else _shorter(batch, t)
        want_loss, want_grads = _step(eager, eager, b, bf16)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            got_loss, got_grads = _step(model, compiled, b, bf16)
        torch.testing.assert_close(got_loss, want_loss, rtol=loss_rtol, atol=0.0)
        _assert_grads_close(got_grads, want_grads, grad_rel)
    return model, compiled, batch


@pytest.mark.parametrize("name", list(MODELS))
def test_inductor_fp32_equals_eager_in_one_graph_for_every_length(name):
    # The same fused fastllm kernels run in both (custom ops are opaque to inductor); what differs is
    # inductor's fusion of the plain-torch parts (bias adds, GELU, embedding sums, bias-gradient reductions),
    # which reorders fp32 sums: measured, the loss is bit-identical and gradients differ by <= 2e-6 of their
    # norm (the bound allows 10x).
    # dynamic=True: one graph serves every batch and sequence length (no specialization on a length).
    _check(name, False, (None, 9, 6), loss_rtol=1e-5, grad_rel=2e-5, dynamic=True)


def test_inductor_bf16_autocast_equals_eager():
    # BERT pre-training covers both fused losses (MLM linear CE on bf16 inputs, NSP CE) and fused LayerNorm
    # on mixed-dtype inputs, with static shapes (torch.compile's default first compile). bf16 keeps 8
    # mantissa bits (2^-8 = 3.9e-3 relative per rounding); inductor keeps fp32 between fused elementwise ops
    # where eager rounds to bf16 after each op, and drops the bf16 round trip of the returned loss (eager
    # rounds it: up to 2^-9). Measured: 8e-4 relative on the loss, 5e-3 of a gradient's norm; the bounds
    # allow 4-5x that.
    model, compiled, batch = _check("bert_pretraining", True, (None,), loss_rtol=2**-8, grad_rel=2e-2)
    # The MLM head keeps static shapes under compile (every row through the transform; linear_cross_entropy
    # skips ignored rows), so another number of masked tokens reuses the graph.
    labels = batch["labels"].clone()
    labels[0, :] = -100
    labels[2, 5] = batch["input_ids"][2, 5]
    other = {**batch, "labels": labels}
    with torch.compiler.set_stance("fail_on_recompile"), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(**other).loss, model(**other).loss
    torch.testing.assert_close(got, want, rtol=2**-8, atol=0.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_dropout_traces_in_one_graph(name):
    """Training configs with hidden and attention dropout capture in one graph. Attention dropout draws its
    seed inside the graph (a tensor, no .item()): before, every attention call was a graph break."""
    torch.manual_seed(0)
    model, batch = MODELS[name](dropout=True)
    model.train()
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(**batch).loss  # traced, no kernels
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
