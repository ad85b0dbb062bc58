"""BERT and its heads: shapes, gradients, overfitting, fused == reference ops, determinism, errors."""
import pytest
import torch
import torch.nn.functional as F

from fastllm.models import (
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    ConfigError,
    preset,
)
from tests.models.helpers import mlm_batch, overfit, require, tiny_bert


def _head_batch(name: str, cfg, b=3, t=13):
    base = mlm_batch(cfg, b, t)
    ids, mask, types = base["input_ids"], base["attention_mask"], base["token_type_ids"]
    common = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if name == "pretraining":
        return base
    if name == "mlm":
        return {**common, "labels": base["labels"]}
    if name == "seq":
        return {**common, "labels": torch.tensor([0, 2, 1])}
    if name == "token":
        return {**common, "labels": torch.randint(0, cfg.num_labels, (b, t))}
    if name == "qa":
        return {**common, "start_positions": torch.tensor([1, 3, 20]), "end_positions": torch.tensor([2, 5, 7])}
    c = 2  # multiple choice: (B, C, T)
    other = ids.roll(1, dims=1)  # a second, different choice
    return {"input_ids": torch.stack([ids, other], dim=1), "attention_mask": mask[:, None].expand(b, c, t),
                "labels": torch.tensor([0, 1, 1])}


HEADS = {"pretraining": BertForPreTraining, "mlm": BertForMaskedLM, "seq": BertForSequenceClassification,
         "token": BertForTokenClassification, "qa": BertForQuestionAnswering, "mc": BertForMultipleChoice}


@pytest.mark.parametrize("name", list(HEADS))
def test_head_forward_backward_and_overfit(name):
    cfg = tiny_bert()
    model = HEADS[name](cfg)
    batch = _head_batch(name, cfg)
    out = model(**batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.bert.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first, last = overfit(HEADS[name](cfg), batch, steps=25)
    assert last < 0.5 * first, (first, last)


def test_output_shapes_in_eval():
    cfg = tiny_bert()
    batch = mlm_batch(cfg)
    b, t = batch["input_ids"].shape
    out = BertForPreTraining(cfg).eval()(**batch)
    assert out.prediction_logits.shape == (b, t, cfg.vocab_size)
    assert out.seq_relationship_logits.shape == (b, 2)
    base = BertModel(cfg)(batch["input_ids"], output_hidden_states=True, output_attentions=True)
    assert base.last_hidden_state.shape == (b, t, 32) and base.pooler_output.shape == (b, 32)
    assert len(base.hidden_states) == cfg.num_hidden_layers + 1
    assert base.attentions[0].shape == (b, 4, t, t)
    qa = BertForQuestionAnswering(cfg)(batch["input_ids"])
    assert qa.start_logits.shape == (b, t) and qa.end_logits.shape == (b, t)


def test_training_mode_skips_logits_unless_asked():
    cfg = tiny_bert()
    model = BertForPreTraining(cfg).train()
    batch = mlm_batch(cfg)
    assert model(**batch).prediction_logits is None
    assert model(**batch, return_logits=True).prediction_logits.shape[-1] == cfg.vocab_size


def test_masked_only_mlm_loss_equals_full_logits_loss():
    cfg = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(cfg).train()
    batch = mlm_batch(cfg)
    out = model(**batch, return_logits=True)
    full = F.cross_entropy(out.prediction_logits.reshape(-1, cfg.vocab_size), batch["labels"].reshape(-1))
    nsp = F.cross_entropy(out.seq_relationship_logits, batch["next_sentence_label"])
    # fp32: the fused CE and torch's CE sum the same ~100 terms in different orders; 1e-5 covers that rounding.
    torch.testing.assert_close(out.mlm_loss, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, full + nsp, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [BertForPreTraining, BertForMaskedLM])
def test_last_layer_on_loss_rows_only_equals_full_layer(cls):
    """Training with labels runs the last layer on the labelled rows and [CLS] only (query_rows); the loss and
    every gradient equal the full computation's (return_logits=True forces the full last layer)."""
    cfg = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_hidden_layers=3)
    torch.manual_seed(0)
    model = cls(cfg).train()
    batch = mlm_batch(cfg, b=4, t=17)  # includes a padded row: keys stay masked for the queried rows
    batch["labels"][0, 0] = 7  # a labelled [CLS] row is selected once, not twice
    if cls is BertForMaskedLM:
        batch.pop("next_sentence_label"), batch.pop("token_type_ids")
    rows = model.loss_rows(batch["labels"], {})
    need = (batch["labels"] != -100).sum(1) + (batch["labels"][:, 0] == -100)  # labelled rows + [CLS]
    assert rows.shape == (4, int(need.max())) and bool((rows[:, 0] == 0).all())
    assert model.bert(batch["input_ids"], batch["attention_mask"], query_rows=rows).last_hidden_state.shape[1] \
        == rows.shape[1] < 17
    sparse_loss, sparse = _loss_and_grads(model, batch)
    full_loss, full = _loss_and_grads(model, batch, return_logits=True)
    assert sparse.keys() == full.keys()
    # fp32: the same sums over different GEMM row counts (MKL blocks them differently); 1e-5 covers that.
    torch.testing.assert_close(sparse_loss, full_loss, rtol=1e-5, atol=1e-6)
    for name in full:
        torch.testing.assert_close(sparse[name], full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_query_rows_are_refused_where_they_do_not_apply():
    cfg = tiny_bert()
    model = BertModel(cfg)
    ids, rows = torch.randint(1, cfg.vocab_size, (2, 9)), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(ids, query_rows=rows, output_hidden_states=True)
    with pytest.raises(ValueError, match="non-causal"):
        model.layers[0].attn(torch.randn(2, 9, cfg.hidden_size), causal=True, query_rows=rows)


def _run(cls, cfg, batch, seed=5):
    torch.manual_seed(seed)
    model = cls(cfg).train()  # dropout on: both backends draw the same seeds and use the same hash mask
    torch.manual_seed(seed + 1)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [BertForPreTraining, BertForSequenceClassification])
def test_fused_ops_equal_reference_ops(cls):
    name = "pretraining" if cls is BertForPreTraining else "seq"
    batch = _head_batch(name, tiny_bert())
    loss_f, grads_f = _run(cls, tiny_bert(kernels="auto"), batch)
    loss_r, grads_r = _run(cls, tiny_bert(kernels="reference"), batch)
    # fp32 on both paths; the fused kernels reorder sums (each op is within a few ulp, tests/ops). Through two
    # layers and the loss the differences stay ~1e-6 relative; 1e-4 relative / 1e-5 absolute leaves margin
    # while a wrong mask, scale or residual would be off by >1e-2.
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_r.keys()
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_r[n], rtol=1e-4, atol=1e-5, msg=n)


def test_backend_is_chosen_at_build_time():
    model = BertModel(tiny_bert(kernels="attention=reference"))
    assert model.layers[0].attn.backend == {"attention": "reference"}
    assert model.layers[0].norm1.backend in ("cpu", "reference")
    with pytest.raises(Exception, match="cuda"):
        BertModel(tiny_bert(kernels="cuda"))


def test_deterministic_with_seed():
    cfg = tiny_bert()
    batch = mlm_batch(cfg)
    a, ga = _run(BertForPreTraining, cfg, batch, seed=3)
    b, gb = _run(BertForPreTraining, cfg, batch, seed=3)
    assert torch.equal(a, b) and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_regression_and_multilabel_problem_types():
    cfg = tiny_bert(num_labels=1)
    batch = _head_batch("seq", cfg)
    out = BertForSequenceClassification(cfg).eval()(**{**batch, "labels": torch.tensor([0.5, -1.0, 2.0])})
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0, 2.0])))
    cfg3 = tiny_bert(num_labels=3)
    multi = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]])
    out = BertForSequenceClassification(cfg3).eval()(**{**batch, "labels": multi})
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, multi))


def test_bf16_autocast_runs_and_is_close():
    cfg = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(cfg).eval()
    batch = mlm_batch(cfg)
    ref = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    # bf16 has 8 mantissa bits (~4e-3 relative per rounding); a ~4.6 loss through 2 layers stays within 3%.
    torch.testing.assert_close(out.loss.float(), ref, rtol=3e-2, atol=0.0)


def test_bad_inputs_name_the_problem():
    cfg = tiny_bert()
    model = BertModel(cfg)
    with pytest.raises(ValueError, match="max_position_embeddings 40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(IndexError, match=r"input_ids contains 101, outside \[0, 101\)"):
        model(torch.tensor([[1, 101]]))
    with pytest.raises(IndexError, match="token_type_ids"):
        model(torch.tensor([[1, 2]]), token_type_ids=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))
    pretraining = BertForPreTraining(cfg).train()
    with pytest.raises(ValueError, match=r"labels has shape \(1, 3\), expected input_ids' \(1, 2\)"):
        pretraining(torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]]))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="hidden_size"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="hidden_dropout_prob"):
        BertConfig(hidden_dropout_prob=1.5)
    with pytest.raises(ConfigError, match="unknown config key.*hiden_size"):
        BertConfig.from_dict({"hiden_size": 8})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        preset("bert-tiny", num_hidden_layers=0)


def test_presets_have_the_published_sizes():
    sizes = {n: (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) for n, c in
             ((n, preset(n)) for n in ("bert-tiny", "bert-mini", "bert-small", "bert-medium", "bert-base",
                                       "bert-large"))}
    assert sizes == {"bert-tiny": (2, 128, 2), "bert-mini": (4, 256, 4), "bert-small": (4, 512, 8),
                     "bert-medium": (8, 512, 8), "bert-base": (12, 768, 12), "bert-large": (24, 1024, 16)}
    transformers = require("transformers")
    cfg = preset("bert-tiny")
    hf = transformers.BertForPreTraining(transformers.BertConfig(**{k: v for k, v in cfg.to_dict().items()
                                                                   if k not in ("kernels", "hidden_act")}))
    count = (lambda m: sum(p.numel() for p in m.parameters()))  # parameters() counts tied weights once
    assert count(BertForPreTraining(cfg)) == count(hf)
