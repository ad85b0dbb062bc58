"""fastllm.nn.Attention: matches a plain PyTorch multi-head attention built from the same weights, GQA, cross-
attention, padding masks, the KV cache (step-by-step decoding equals one causal pass) and dropout."""
import pytest
import torch
import torch.nn.functional as F

from fastllm.nn import Attention, KVCache


def _torch_attention(m: Attention, x, memory=None, mask=None):
    """The same computation with torch's SDPA (the oracle)."""
    hd, h, hkv = m.head_dim, m.num_heads, m.num_kv_heads
    if m.cross:
        q = m.q_proj(x)
        k, v = m.kv_proj(memory).split(hkv * hd, dim=-1)
    else:
        q, k, v = m.qkv_proj(x).split([m.d_model, hkv * hd, hkv * hd], dim=-1)
    heads = (lambda t, n: t.view(t.shape[0], t.shape[1], n, hd).transpose(1, 2))
    q, k, v = heads(q, h), heads(k, hkv).repeat_interleave(h // hkv, 1), heads(v, hkv).repeat_interleave(h // hkv, 1)
    attn_mask = None if mask is None else mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=m.causal and mask is None)
    return m.out_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], m.d_model))


@pytest.mark.parametrize("hkv, causal", [(4, False), (2, True), (1, True)])
def test_self_attention_matches_torch(hkv, causal):
    m = Attention(64, 4, hkv, causal=causal)
    assert m.backend == "cpu"
    x = torch.randn(3, 11, 64, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, _torch_attention(m, x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    _torch_attention(m, x).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)


def test_cross_attention_with_padding_mask():
    m = Attention(32, 4, 2, cross=True)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    torch.testing.assert_close(m(x, mem, key_padding_mask=mask), _torch_attention(m, x, mem, mask),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs `memory`"):
        m(x)


def test_kv_cache_decoding_equals_one_causal_pass():
    m = Attention(48, 6, 2, causal=True).eval()
    x = torch.randn(2, 10, 48)
    full = m(x)
    cache = KVCache()
    prefix = m(x[:, :4], cache=cache)  # prefill 4 positions
    steps = [m(x[:, t:t + 1], cache=cache) for t in range(4, 10)]  # then one token at a time
    assert len(cache) == 10
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_and_reproducible():
    m = Attention(32, 4, dropout=0.5)
    x = torch.randn(2, 7, 32)
    a, b = m(x, generator_seed=1), m(x, generator_seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, m(x, generator_seed=2))
    m.eval()
    torch.testing.assert_close(m(x), _torch_attention(m, x), rtol=1e-5, atol=1e-5)


def test_backend_choice_and_bad_arguments():
    assert Attention(16, 2, backend="reference").backend == "reference"
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(16, 4, 3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(15, 4)
    with pytest.raises(ValueError, match=r"x must be \(B, T, 16\)"):
        Attention(16, 2)(torch.randn(2, 3, 8))


def test_torch_compile_fullgraph():
    m = Attention(32, 4, 2, causal=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
