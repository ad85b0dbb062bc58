"""Encoder-decoder Transformer: shapes, label-smoothed loss, overfitting, fused == reference, vocabularies."""
import pytest
import torch
import torch.nn.functional as F

from fastllm.models import ConfigError, Transformer, TransformerConfig, preset
from fastllm.models.transformer import shift_right
from tests.models.helpers import overfit, tiny_transformer


def _batch(cfg, b=3):
    g = torch.Generator().manual_seed(4)
    src = torch.randint(3, cfg.src_vocab_size, (b, 11), generator=g)
    mask = torch.ones(b, 11, dtype=torch.long)
    mask[0, 8:] = 0
    labels = torch.randint(3, cfg.tgt_vocab_size, (b, 9), generator=g)
    labels[1, 7:] = -100
    return {"input_ids": src, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kw", [{}, {"share_embeddings": False, "tgt_vocab_size": 37, "norm": "pre"}])
def test_forward_backward_and_overfit(kw):
    cfg = tiny_transformer(**kw)
    batch = _batch(cfg)
    model = Transformer(cfg)
    out = model(**batch, return_logits=True)
    assert out.logits.shape == (3, 9, cfg.tgt_vocab_size)
    assert out.encoder_last_hidden_state.shape == (3, 11, 32)
    out.loss.backward()
    first, last = overfit(Transformer(cfg), batch, steps=30)
    assert last < 0.6 * first, (first, last)


def test_label_smoothed_loss_matches_torch():
    cfg = tiny_transformer(label_smoothing=0.1)
    batch = _batch(cfg)
    out = Transformer(cfg).eval()(**batch)
    ref = F.cross_entropy(out.logits.reshape(-1, cfg.tgt_vocab_size), batch["labels"].reshape(-1),
                          label_smoothing=0.1)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)  # fp32, summation order only


def test_shared_vocabulary_shares_one_embedding():
    model = Transformer(tiny_transformer())
    assert model.src_embed is model.tgt_embed and model.output_weight is model.src_embed.word.weight
    assert "sinusoid" not in model.state_dict()  # the fixed table is not a weight


def test_fused_ops_equal_reference_ops():
    batch = _batch(tiny_transformer())

    def run(kernels):
        torch.manual_seed(3)
        model = Transformer(tiny_transformer(kernels=kernels, attention_dropout=0.1)).train()
        torch.manual_seed(4)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (lf, gf), (lr, gr), (la, ga) = run("auto"), run("reference"), run("auto")
    assert torch.equal(lf, la) and all(torch.equal(gf[n], ga[n]) for n in gf)  # deterministic with a seed
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)  # fp32: kernel sum order only (see test_bert)
    for n in gf:
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-4, atol=1e-5, msg=n)


def test_shift_right_and_config_errors():
    assert shift_right(torch.tensor([[5, 6, -100]]), 1, 0).tolist() == [[1, 5, 6]]
    with pytest.raises(ConfigError, match="share_embeddings"):
        TransformerConfig(src_vocab_size=10, tgt_vocab_size=12, share_embeddings=True)
    assert preset("transformer-base").d_model == 512


def test_bf16_autocast_is_close():
    cfg = tiny_transformer(dropout=0.0)
    model = Transformer(cfg).eval()
    batch = _batch(cfg)
    ref = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    # bf16 (8 mantissa bits) through 2 + 2 layers: the ~4.5 loss stays within 3%.
    torch.testing.assert_close(out.loss.float(), ref, rtol=3e-2, atol=0.0)
