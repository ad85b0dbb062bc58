"""GPT: shapes, loss = shifted CE, overfitting, fused == reference, cache, RoPE/GQA variants, errors (compile:
test_compile.py)."""
import pytest
import torch
import torch.nn.functional as F

from fastllm.models import GPT, ConfigError, GPTConfig, preset
from tests.models.helpers import overfit, tiny_gpt


def _batch(cfg, b=2, t=17):
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("kw", [{}, {"position": "rope", "n_kv_head": 2, "activation_function": "swiglu"}])
def test_forward_backward_shapes_and_overfit(kw):
    cfg = tiny_gpt(**kw)
    batch = _batch(cfg)
    model = GPT(cfg)
    out = model(**batch, return_logits=True, output_hidden_states=True)
    assert out.logits.shape == (2, 17, cfg.vocab_size) and len(out.hidden_states) == cfg.n_layer + 1
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    first, last = overfit(GPT(cfg), batch, steps=30)
    assert last < 0.5 * first, (first, last)


def test_loss_is_shifted_cross_entropy():
    cfg = tiny_gpt()
    batch = _batch(cfg)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, 5] = -100
    out = GPT(cfg).eval()(**batch)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)  # fp32, summation order only


def _grads(cfg, batch):
    torch.manual_seed(7)
    model = GPT(cfg).train()
    torch.manual_seed(8)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_fused_ops_equal_reference_ops():
    batch = _batch(tiny_gpt())
    lf, gf = _grads(tiny_gpt(), batch)
    lr, gr = _grads(tiny_gpt(kernels="reference"), batch)
    # fp32 both; the fused kernels reorder sums (a few ulp per op). 1e-4 rel / 1e-5 abs on gradients leaves
    # margin over the ~1e-6 drift through two layers while catching any semantic difference.
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    for n in gf:
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-4, atol=1e-5, msg=n)


def test_cached_forward_equals_full_forward():
    cfg = tiny_gpt(position="rope", n_kv_head=2)
    model = GPT(cfg).eval()
    ids = _batch(cfg)["input_ids"]
    full = model(ids).logits
    a = model(ids[:, :9], use_cache=True)
    b = model(ids[:, 9:], past_key_values=a.past_key_values, use_cache=True)
    # fp32; cached attention sums over the same keys in the same order, only the blocking differs.
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full, rtol=1e-5, atol=1e-5)


def test_deterministic_and_bf16_autocast():
    cfg = tiny_gpt()
    batch = _batch(cfg)
    l1, g1 = _grads(cfg, batch)
    l2, g2 = _grads(cfg, batch)
    assert torch.equal(l1, l2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    model = GPT(cfg).eval()
    ref = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    # bf16 (8 mantissa bits, ~4e-3 per rounding) through two layers: the ~4.6 loss stays within 3%.
    torch.testing.assert_close(out.loss.float(), ref, rtol=3e-2, atol=0.0)


def test_errors_name_the_problem():
    model = GPT(tiny_gpt())
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(IndexError, match="input_ids contains -1"):
        model(torch.tensor([[3, -1]]))
    with pytest.raises(ValueError, match=r"labels has shape \(1, 3\), expected input_ids' \(1, 2\)"):
        model(torch.tensor([[3, 1]]), labels=torch.tensor([[3, 1, 2]]))
    with pytest.raises(ValueError, match="prompt length 40 \\+ max_new_tokens 10 needs 49 positions"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), max_new_tokens=10)  # fails before any work
    assert model.generate(torch.zeros(1, 40, dtype=torch.long), max_new_tokens=9).shape == (1, 49)  # 48 fed
    with pytest.raises(ConfigError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    assert preset("gpt2-small").n_layer == 12 and preset("gpt2-large").n_embd == 1280
