"""Tensor parallelism: tp=2 gloo runs reproduce the single-process model (loss, canonical gradients, logits, AdamW).

Invariants of this file: ONE spawned 2-process run (module fixture) computes every tp=2 result and returns it;
the parent builds the same models from the same seeds and compares. Vocabularies are 1001 (odd: rank 1 holds
one padding row) and 997; pad ids sit on either rank.

Tolerances (fp32): TP changes only the order of summation (hidden / vocabulary sums split into two partial sums
joined by an all-reduce, chunked vs fused cross-entropy), so results differ by a few ulps of the terms summed:
~1e-7 relative for losses and ~1e-6 of a tensor's largest entry for its gradient. We allow rtol 1e-5 plus an
absolute 1e-5 x the tensor's max |value|; a wrong shard, head order or missing reduction is O(1) off.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastllm.models import BertConfig, GPTConfig, TransformerConfig
from fastllm.models.bert import BertForMaskedLM, BertForPreTraining, BertForSequenceClassification
from fastllm.models.gpt import GPT
from fastllm.models.transformer import Transformer
from fastllm.parallel.mesh import Mesh
from fastllm.parallel.tensor_parallel import (
    TensorParallelError,
    VocabParallelLoss,
    apply_tensor_parallel,
    check_sequence_parallel,
    check_tensor_parallel,
    gather_canonical,
    gather_vocab_logits,
    shard_canonical,
    sync_sequence_parallel_grads,
    vocab_index,
)
from tests.parallel.harness import run_distributed

V = 1001
NO_DROP = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
BERT = {"vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
T5 = {"d_model": 32, "num_encoder_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "d_ff": 64, "dropout": 0.0,
      "attention_dropout": 0.0, "label_smoothing": 0.1, "max_position_embeddings": 32}


def _ids(b, t, vocab, g):
    ids = torch.randint(0, vocab, (b, t), generator=g)  # (B, T)
    ids[0, :3] = torch.tensor([vocab - 1, 0, vocab // 2 + 1])  # last row (rank 1), row 0 and rank 1's first rows
    return ids


def _labels(ids, g, frac=0.5):
    return ids.masked_fill(torch.rand(ids.shape, generator=g) > frac, -100)  # (B, T) about half ignored


def _case(name):
    """(model, batch, vocab of the logits or None, name of the logits field); same on every process."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name in ("gpt", "gpt_gqa"):
        extra = {} if name == "gpt" else {"n_kv_head": 2, "activation_function": "swiglu", "position": "rope",
                                          "tie_word_embeddings": False, "n_inner": 48}
        model = GPT(GPTConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, **NO_DROP, **extra))
        ids = _ids(2, 12, V, g)
        ids[1, -1] = V - 1
        return model, {"input_ids": ids, "labels": ids.clone()}, V, "logits"
    if name in ("bert_pt", "bert_mlm", "bert_cls", "bert_untied"):
        pad = 700 if name == "bert_cls" else 0  # the padding row on rank 1 (no tied decoder there) / rank 0
        cls = {"bert_pt": BertForPreTraining, "bert_mlm": BertForMaskedLM, "bert_cls": BertForSequenceClassification,
               "bert_untied": BertForPreTraining}
        tie = name != "bert_untied"  # untied: the MLM decoder's own (V, H) weight and bias, vocab-sharded
        model = cls[name](BertConfig(**BERT, pad_token_id=pad, num_labels=3, tie_word_embeddings=tie))
        ids = _ids(2, 10, V, g)
        ids[1, -2:] = pad
        batch = {"input_ids": ids, "token_type_ids": (torch.arange(10) >= 5).long().expand(2, 10)}
        if name == "bert_cls":
            return model, {**batch, "labels": torch.tensor([2, 0])}, None, None
        batch["labels"] = _labels(ids, g, 0.3)
        batch["labels"][0, 0] = V - 1  # the last real vocabulary row as a target
        if name == "bert_pt":
            batch["next_sentence_label"] = torch.tensor([1, 0])
        return model, batch, V, "logits" if name == "bert_mlm" else "prediction_logits"
    shared = name == "t5_shared"
    src = V if shared else 997
    model = Transformer(TransformerConfig(src_vocab_size=src, tgt_vocab_size=V, share_embeddings=shared,
                                          norm="post" if shared else "pre", **T5))
    labels = _labels(_ids(2, 9, V, g), g, 0.8)
    return model, {"input_ids": _ids(2, 11, src, g), "labels": labels}, V, "logits"


CASES = ("gpt", "gpt_gqa", "bert_pt", "bert_mlm", "bert_cls", "bert_untied", "t5_shared", "t5_split")


def _grads(model, full):
    return {n: None if p.grad is None else full(p.grad, p) for n, p in model.named_parameters()}


def _step_results(model, batch, field, vocab, full, gather_logits, after_backward=None):
    """Loss and canonical gradients of one training step, then eval-mode logits (canonical)."""
    loss = model(**batch).loss
    loss.backward()
    if after_backward is not None:
        after_backward(model)
    out = {"loss": loss.item(), "grads": _grads(model, full), "logits": None,
           "shapes": {n: tuple(full(p.detach(), p).shape) for n, p in model.named_parameters()}}
    if field is not None:
        model.eval()
        with torch.no_grad():
            kw = {k: v for k, v in batch.items() if k in ("input_ids", "token_type_ids")}
            if isinstance(model, Transformer):  # teacher-forced decoder inputs
                kw["decoder_input_ids"] = batch["labels"].clamp(min=0)
            out["logits"] = gather_logits(model(**kw)[field], vocab)
        model.train()
    return out


def _train(model, batch, steps=3):
    # eps=1e-3 (not 1e-8) bounds how much Adam amplifies rounding differences between layouts:
    # |d update| <= lr |d grad| / eps ~ 1e-2 * 1e-9 / 1e-3. With a tiny eps, entries whose gradient is 0 in
    # exact arithmetic (key biases: softmax ignores a constant added to every score) or crosses 0 turn ~1e-9
    # rounding noise into +-lr steps of either sign, so single entries would differ by ~lr between layouts.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _loss_check(mesh):
    """VocabParallelLoss with bias, smoothing and ignored rows vs F.cross_entropy on full logits."""
    g = torch.Generator().manual_seed(3)
    hidden, weight, bias = (torch.randn(s, generator=g) for s in ((40, 16), (V, 16), (V,)))
    labels = torch.randint(0, V, (40,), generator=g)
    labels[:5], labels[5:8] = -100, torch.tensor([V - 1, 0, 500])
    full = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref = F.cross_entropy(F.linear(full[0], full[1], full[2]), labels, label_smoothing=0.2)
    ref.backward()
    layout = SimpleNamespace(tp_dim=0, tp_index=vocab_index(V, mesh.size("tp"), mesh.tp_rank))
    h, w, b = hidden.clone().requires_grad_(), shard_canonical(weight, layout), shard_canonical(bias, layout)
    w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
    w.tp_dim, w.tp_index = layout.tp_dim, layout.tp_index
    loss = VocabParallelLoss(mesh, 0.2, chunk_size=16)(h, w, labels, b)  # 3 chunks of rows
    loss.backward()
    got = [h.grad, gather_canonical(w.grad, layout, mesh), gather_canonical(b.grad, layout, mesh)]
    return {"loss": (loss.item(), ref.item()), "grads": list(zip(got, [t.grad for t in full]))}


def _roundtrip(model, canonical, mesh):
    """gather_canonical(shard_canonical(x)) == x for random x of every canonical parameter's shape."""
    g = torch.Generator().manual_seed(4)
    shapes = {n: p.shape for n, p in canonical.named_parameters()}
    worst = 0.0
    for n, p in model.named_parameters():
        x = torch.randn(shapes[n], generator=g)
        worst = max(worst, (gather_canonical(shard_canonical(x, p), p, mesh) - x).abs().max().item())
    return worst


def _padding_rows(model):
    """Padding rows of every vocabulary shard: their values and gradients (must be exactly zero)."""
    out = []
    for n, p in model.named_parameters():
        if hasattr(p, "tp_index") and (p.tp_index < 0).any():
            pad = (p.tp_index < 0).nonzero().squeeze(1)
            out.append((n, p.detach().index_select(0, pad).abs().max().item(),
                        p.grad.index_select(0, pad).abs().max().item()))
    return out


def _errors(mesh):
    bad = [GPTConfig(vocab_size=50, n_positions=8, n_embd=24, n_head=3, n_layer=1),
           GPTConfig(vocab_size=50, n_positions=8, n_embd=16, n_head=4, n_kv_head=1, n_layer=1),
           GPTConfig(vocab_size=50, n_positions=8, n_embd=16, n_head=2, n_inner=33, n_layer=1)]
    msgs = []
    for c in bad:
        try:
            apply_tensor_parallel(GPT(c), mesh)
            msgs.append(None)
        except TensorParallelError as e:
            msgs.append(str(e))
    return msgs


SP_CASES = ("gpt", "gpt_gqa", "bert_pt")


def _sp_shapes(model, batch):
    """(module, shapes of its tensor inputs / output) at the block boundaries of one training forward."""
    seen = []
    record = (lambda name: lambda mod, args: seen.append((name, [tuple(a.shape) for a in args if torch.is_tensor(a)])))
    enc = model if isinstance(model, GPT) else model.bert
    hooks = [layer.register_forward_pre_hook(record(f"layers.{i}")) for i, layer in enumerate(enc.layers)]
    hooks.append(enc.embeddings.register_forward_hook(lambda mod, args, out: seen.append(("embeddings",
                                                                                          [tuple(out.shape)]))))
    if isinstance(model, GPT):
        hooks.append(model.ln_f.register_forward_pre_hook(record("ln_f")))
        hooks.append(model.ln_f.register_forward_hook(lambda mod, args, out: seen.append(("head",
                                                                                         [tuple(out[0].shape)]))))
    else:
        hooks.append(model.bert.pooler.register_forward_pre_hook(record("head")))
    model(**batch)
    for h in hooks:
        h.remove()
    return seen


def _sp_dropout(mesh, full):
    """GPT with every dropout at 0.1, tp=2 with and without sequence parallelism: (loss, grads, eval loss) each."""
    out = []
    g = torch.Generator().manual_seed(1)
    ids = _ids(2, 12, V, g)
    for sp in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.1,
                              embd_pdrop=0.1, attn_pdrop=0.1))
        apply_tensor_parallel(model, mesh, sequence_parallel=sp)
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync_sequence_parallel_grads([(p, p.grad) for p in model.parameters()], mesh)
        model.eval()
        with torch.no_grad():
            clean = model(input_ids=ids, labels=ids).loss.item()
        out.append((loss.item(), _grads(model, full), clean))
    return out


def _sp_worker(mesh, full, logits):
    """Sequence parallelism at tp=2: step results (grads summed over tp), block-boundary shapes, flags, errors."""
    out = {}
    sync = (lambda m: sync_sequence_parallel_grads([(p, p.grad) for p in m.parameters()], mesh))
    for name in SP_CASES:
        model, batch, vocab, field = _case(name)
        apply_tensor_parallel(model, mesh, sequence_parallel=True)
        out[name] = _step_results(model, batch, field, vocab, full, logits, after_backward=sync)
        out[name]["flagged"] = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", 0))
        model.zero_grad()
        out[name]["seen"] = _sp_shapes(model, batch)
        try:  # odd T over tp = 2: raised on both ranks before any collective, so the ranks stay in step
            model(**{k: v[:, :-1] for k, v in batch.items() if k in ("input_ids", "token_type_ids", "labels")})
            out[name]["error"] = None
        except TensorParallelError as e:
            out[name]["error"] = str(e)
    out["dropout"] = _sp_dropout(mesh, full)
    return out


def _tp_worker(rank, world):
    mesh = Mesh(tp=world)
    full = (lambda t, p: gather_canonical(t, p, mesh))
    logits = (lambda x, v: gather_vocab_logits(x, v, mesh))
    out = {"errors": _errors(mesh)}  # first: raised before any collective, so the ranks stay in step
    for name in CASES:
        model, batch, vocab, field = _case(name)
        apply_tensor_parallel(model, mesh)
        out[name] = _step_results(model, batch, field, vocab, full, logits)
        if name == "gpt_gqa":
            out["padding"] = _padding_rows(model)
            out["roundtrip"] = _roundtrip(model, _case(name)[0], mesh)
            out["local_heads"] = (model.layers[0].attn.heads, model.layers[0].attn.kv_heads)
    for name in ("gpt_gqa", "bert_pt", "t5_shared"):
        model, batch, _, _ = _case(name)
        apply_tensor_parallel(model, mesh)
        out[f"train_{name}"] = (_train(model, batch), {n: full(p.detach(), p) for n, p in model.named_parameters()})
    out["vocab_loss"] = _loss_check(mesh)
    out["sp"] = _sp_worker(mesh, full, logits)
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp_worker, 2)


def _close(got, want, what):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale + 1e-12, msg=lambda m: f"{what}: {m}")


def _reference(name):
    model, batch, vocab, field = _case(name)
    return _step_results(model, batch, field, vocab, lambda t, p: t, lambda x, v: x)


def _assert_matches(got: dict, ref: dict, rank: int) -> None:
    """Parameter names and shapes, loss, every canonical gradient and eval logits equal one process's."""
    assert got["shapes"] == ref["shapes"], "parameter names or canonical shapes differ"
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"rank {rank}"
    for n, g in ref["grads"].items():
        assert (got["grads"][n] is None) == (g is None), n
        if g is not None:
            _close(got["grads"][n], g, f"rank {rank} grad {n}")
    if ref["logits"] is not None:
        assert got["logits"].shape == ref["logits"].shape
        _close(got["logits"], ref["logits"], f"rank {rank} logits")


@pytest.mark.parametrize("name", CASES)
def test_loss_grads_and_logits_match_single_process(tp2, name):
    ref = _reference(name)
    for rank, res in enumerate(tp2):
        _assert_matches(res[name], ref, rank)


def test_vocab_padding_and_padding_idx(tp2):
    r0, r1 = tp2
    assert r0["padding"] == [] and len(r1["padding"]) == 2  # V=1001: one padding row, on rank 1 (wte, lm_head)
    assert all(value == 0.0 and grad == 0.0 for _, value, grad in r1["padding"])
    word = r0["bert_cls"]["grads"]["bert.embeddings.word.weight"]  # (V, H) canonical; no tied decoder
    used = _case("bert_cls")[1]["input_ids"][0, 0]  # a non-pad id present in the batch
    assert word[700].abs().max() == 0 and word[used].abs().max() > 0  # pad row 700 (rank 1): no gradient
    assert r0["local_heads"] == (2, 1)  # 4 heads, 2 kv heads over tp=2


def test_shard_gather_roundtrip(tp2):
    assert tp2[0]["roundtrip"] == 0.0 and tp2[1]["roundtrip"] == 0.0


@pytest.mark.parametrize("name", ("gpt_gqa", "bert_pt", "t5_shared"))
def test_adamw_training_matches_single_process(tp2, name):
    model, batch, _, _ = _case(name)
    losses = _train(model, batch)
    for res in tp2:
        got_losses, params = res[f"train_{name}"]
        assert got_losses == pytest.approx(losses, rel=1e-5)
        for n, p in model.named_parameters():
            _close(params[n], p.detach(), f"param {n} after 3 AdamW steps")


def test_vocab_parallel_loss_matches_cross_entropy(tp2):
    for res in tp2:
        got, want = res["vocab_loss"]["loss"]
        assert got == pytest.approx(want, rel=1e-5)
        for (g, r), what in zip(res["vocab_loss"]["grads"], ("hidden", "weight", "bias")):
            _close(g, r, what)


def test_errors_name_the_size_and_tp(tp2):
    for res in tp2:  # identical on every rank
        heads, kv, mlp = res["errors"]
        assert "heads = 3 is not divisible by tp = 2" in heads
        assert "kv_heads = 1 is not divisible by tp = 2" in kv
        assert "intermediate size 33 is not divisible by tp = 2" in mlp


def test_check_tensor_parallel_without_processes():
    model = GPT(GPTConfig(vocab_size=50, n_positions=8, n_embd=24, n_head=6, n_layer=1))
    check_tensor_parallel(model, 2)
    check_tensor_parallel(model, 3)
    with pytest.raises(TensorParallelError, match="heads = 6 is not divisible by tp = 4"):
        check_tensor_parallel(model, 4)
    with pytest.raises(ValueError, match="MLP intermediate size 42 is not divisible by tp = 5"):
        check_tensor_parallel(GPT(GPTConfig(vocab_size=50, n_positions=8, n_embd=20, n_head=5, n_inner=42,
                                            n_layer=1)), 5)


def test_tp1_is_a_no_op_and_twice_is_an_error():
    model = GPT(GPTConfig(vocab_size=50, n_positions=8, n_embd=16, n_head=2, n_layer=1))
    names = [n for n, _ in model.named_parameters()]
    assert apply_tensor_parallel(model, Mesh()) is model and model.tp_mesh.tp == 1
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(TensorParallelError, match="already tensor-parallel"):
        apply_tensor_parallel(model, Mesh())


@pytest.mark.parametrize("name", SP_CASES)
def test_sequence_parallel_matches_single_process(tp2, name):
    """Loss, canonical gradients (partial ones summed over tp) and eval logits equal one process."""
    ref = _reference(name)
    assert ref["logits"] is not None
    for rank, res in enumerate(tp2):
        _assert_matches(res["sp"][name], ref, rank)


@pytest.mark.parametrize("name", SP_CASES)
def test_sequence_parallel_activations_are_split_along_t(tp2, name):
    """Between blocks every rank holds (B, T/tp, H) (GPT: delta and residual both); the heads see the full T."""
    b, t = _case(name)[1]["input_ids"].shape
    for res in tp2:
        seen = dict(res["sp"][name]["seen"])
        blocks = [k for k in seen if k.startswith("layers.")]
        assert len(blocks) == 2 and seen["embeddings"] == [(b, t // 2, 32)]
        for k in blocks:  # GPT's first block gets the embedding output alone, later ones (delta, residual)
            assert seen[k] and all(s == (b, t // 2, 32) for s in seen[k]), (k, seen[k])
        if name.startswith("gpt"):
            assert seen["ln_f"] == [(b, t // 2, 32)] * 2
        assert seen["head"] == [(b, t, 32)]  # all-gathered where the sequence leaves the split region
        flagged, pre = res["sp"][name]["flagged"], "bert." if name == "bert_pt" else ""
        assert f"{pre}layers.0.norm1.weight" in flagged and f"{pre}layers.1.attn.out.bias" in flagged, flagged
        assert f"{pre}layers.1.mlp.fc_out.bias" in flagged and f"{pre}layers.0.attn.qkv.bias" not in flagged
        if name == "bert_pt":
            assert {"bert.embeddings.position.weight", "bert.embeddings.token_type.weight",
                    "bert.embeddings.norm.weight"} <= set(flagged)
            assert not any(n.startswith(("mlm.", "nsp.", "bert.pooler.")) for n in flagged)
        else:
            assert "ln_f.weight" in flagged and ("embeddings.position.weight" in flagged) == (name == "gpt")
        assert not any(n.endswith("word.weight") for n in flagged)


def test_sequence_parallel_errors_and_dropout(tp2):
    for res in tp2:
        for name in SP_CASES:
            t = _case(name)[1]["input_ids"].shape[1] - 1
            assert f"sequence length T = {t} is not divisible by tp = 2" in res["sp"][name]["error"]
        (loss, grads, clean), (sp_loss, sp_grads, _) = res["sp"]["dropout"]
        assert abs(loss - clean) > 1e-4  # dropout is active (a 2e-3 change at init)
        assert sp_loss == pytest.approx(loss, rel=1e-5)  # SP dropout draws plain TP's masks
        for n, g in grads.items():
            _close(sp_grads[n], g, f"dropout grad {n}")


def test_sequence_parallel_needs_gpt_or_bert_and_is_a_no_op_at_tp1():
    t5 = Transformer(TransformerConfig(src_vocab_size=50, tgt_vocab_size=50, **T5))
    with pytest.raises(TensorParallelError, match="supports GPT and BERT models, got Transformer"):
        check_sequence_parallel(t5)
    model = GPT(GPTConfig(vocab_size=50, n_positions=8, n_embd=16, n_head=2, n_layer=1))
    apply_tensor_parallel(model, Mesh(), sequence_parallel=True)
    assert not hasattr(model, "tp_sequence_parallel") and not model.ln_f._forward_hooks
    assert not any(hasattr(p, "sequence_parallel") for p in model.parameters())
