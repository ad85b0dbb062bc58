"""fastllm.nn.tied: the tied word embedding's two gradients summed in the head's buffer equal plain autograd's."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastllm.nn.tied as tied_mod
from fastllm.models import GPT, BertForPreTraining
from fastllm.nn.tied import TiedGrad
from fastllm.ops.cross_entropy import linear_cross_entropy
from tests.models.helpers import tiny_bert, tiny_gpt

V, H = 50, 8


@pytest.fixture
def takes(monkeypatch):
    """Records, per lookup backward, whether it added into the head's buffer (True) or fell back (False)."""
    seen = []
    take = TiedGrad.take

    def recording(self, like):
        buf = take(self, like)
        seen.append(buf is not None)
        return buf

    monkeypatch.setattr(tied_mod.TiedGrad, "take", recording)
    return seen


def _grad(use_tie: bool, extra: str | None = None, padding_idx=0, retain: bool = False):
    """W.grad of a tied lookup + linear_cross_entropy head; extra adds a third use of W before/after."""
    g = torch.Generator().manual_seed(1)
    emb = nn.Embedding(V, H, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, H, generator=g))
    w = emb.weight
    ids = torch.randint(0, V, (3, 5), generator=g)  # (B, T)
    ids[0, :2] = padding_idx if padding_idx is not None else 1  # repeated ids, and the padding row
    labels = torch.randint(0, V, (15,), generator=g)  # (B*T,)
    tie = TiedGrad()
    x = tie.lookup(emb, ids) if use_tie else F.embedding(ids, w, padding_idx)  # (B, T, H)
    loss = linear_cross_entropy(torch.tanh(x).reshape(-1, H), tie.head_weight(w, emb) if use_tie else w, labels)
    if extra == "after":
        loss = loss + 0.1 * (w ** 2).sum()
    if extra == "before":
        loss = 0.1 * (w[:7] ** 3).sum() + loss
    if retain:
        loss.backward(retain_graph=True)
    loss.backward()
    return w.grad


# The tied path adds the lookup's rows into the head's gradient in another order than autograd's
# head + dense(lookup) sum: fp32 reassociation of |values| <= ~1, so 1e-6 absolute bounds it.
def test_plain_tie_adds_into_the_head_buffer_and_equals_autograd(takes):
    expected = _grad(False)
    got = _grad(True)
    assert takes == [True]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_padding_row_gets_only_the_head_gradient():
    no_lookup = _grad(True, padding_idx=0)
    plain = _grad(False, padding_idx=0)
    torch.testing.assert_close(no_lookup[0], plain[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra", ["before", "after"])
def test_a_third_use_of_the_weight_still_gives_the_full_gradient(takes, extra):
    torch.testing.assert_close(_grad(True, extra), _grad(False, extra), rtol=0, atol=1e-6)


def test_retain_graph_falls_back_then_reuses(takes):
    torch.testing.assert_close(_grad(True, retain=True), _grad(False, retain=True), rtol=0, atol=1e-6)
    assert takes == [False, True]  # the retained backward must not write into a tensor it may see again


def test_double_backward_and_no_grad_use_the_plain_paths(takes):
    emb = nn.Embedding(V, H)
    w = emb.weight
    ids = torch.randint(0, V, (2, 3))
    tie = TiedGrad()
    with torch.no_grad():
        assert tie.head_weight(w, emb) is w
        torch.testing.assert_close(tie.lookup(emb, ids), F.embedding(ids, w))
    x = tie.lookup(emb, ids)
    (g,) = torch.autograd.grad((x ** 2).sum() + (tie.head_weight(w, emb) ** 2).sum(), w, create_graph=True)
    torch.testing.assert_close(g, 2 * w + 2 * F.embedding(ids, w).new_zeros(V, H).index_add(
        0, ids.reshape(-1), F.embedding(ids, w).reshape(-1, H)))
    assert takes == [False]
    sparse = nn.Embedding(V, H, sparse=True)  # not a plain embedding: its own lookup, the plain head weight
    assert tie.lookup(sparse, ids).grad_fn.name() == "EmbeddingBackward0"
    assert tie.head_weight(sparse.weight, sparse) is sparse.weight


@pytest.mark.parametrize("model_cls", [BertForPreTraining, GPT])
def test_models_tie_gradients_equal_the_untied_lookup(takes, model_cls):
    torch.manual_seed(0)
    model = model_cls(tiny_bert() if model_cls is BertForPreTraining else tiny_gpt()).eval()
    emb = model.bert.embeddings if model_cls is BertForPreTraining else model.embeddings
    ids = torch.randint(1, emb.vocab_size, (2, 12))  # (B, T)
    labels = torch.where(torch.rand(2, 12) < 0.4, ids, torch.full_like(ids, -100))
    kw = {"labels": labels} if model_cls is BertForPreTraining else {"labels": ids}
    grads = []
    for tie in (emb.tied, None):
        emb.tied = tie
        model.zero_grad(set_to_none=True)
        model(ids, **kw).loss.backward()
        grads.append(emb.word.weight.grad.clone())
    assert takes == [True]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)  # same reassociation bound as above
    copy.deepcopy(model), pickle.loads(pickle.dumps(model))  # the tie holds no state between backwards
