"""fastllm.nn.linear: Linear layers whose weight gradient reuses a buffer across steps, never one still in use."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllm.models import GPT, BertForPreTraining
from fastllm.nn.linear import GradBuffer, linear, release_grad_buffers, row_split_linear
from tests.models.helpers import tiny_bert, tiny_gpt


def _layer(bias=True):
    torch.manual_seed(0)
    return nn.Linear(12, 7, bias=bias)


def _grads(lin, x, fast: bool, buf=None):
    lin.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    y = linear(lin, xx, buf or GradBuffer()) if fast else lin(xx)
    (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).sin()).sum().backward()
    return y, xx.grad, lin.weight.grad, None if lin.bias is None else lin.bias.grad


@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_nn_linear(bias):
    lin, x = _layer(bias), torch.randn(3, 5, 12)
    for got, want in zip(_grads(lin, x, True), _grads(lin, x, False)):
        if want is None:
            assert got is None
        else:  # the same products on the same operands (rows flattened): equal to fp32 rounding of the GEMM calls
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_buffer_is_adopted_reused_and_never_overwrites_a_kept_gradient():
    lin, x, buf = _layer(), torch.randn(4, 12), GradBuffer()
    _, _, g1, _ = _grads(lin, x, True, buf)
    assert g1.data_ptr() == buf._buf.data_ptr()  # AccumulateGrad adopted it: no copy
    g1 = None
    _, _, g2, _ = _grads(lin, 2 * x, True, buf)  # .grad was dropped: the same memory is written again
    assert g2.data_ptr() == buf._buf.data_ptr()
    kept = lin.weight.grad  # the user keeps this gradient
    snapshot = kept.clone()
    _, _, g3, _ = _grads(lin, 3 * x, True, buf)
    assert g3.data_ptr() != kept.data_ptr() and torch.equal(kept, snapshot)
    torch.testing.assert_close(g3, 1.5 * snapshot, rtol=1e-5, atol=1e-6)  # the gradient is linear in x


def test_accumulation_and_a_layer_used_twice_in_one_graph():
    lin, x, buf = _layer(), torch.randn(4, 12), GradBuffer()
    linear(lin, x, buf).sum().backward()
    linear(lin, x, buf).sum().backward()  # .grad kept: accumulated
    twice = lin.weight.grad.clone()
    lin.zero_grad(set_to_none=True)
    (linear(lin, x, buf).sum() + linear(lin, x, buf).sum()).backward()  # two nodes, one buffer
    once = lin.weight.grad.clone()
    lin.zero_grad(set_to_none=True)
    (2 * lin(x).sum()).backward()
    torch.testing.assert_close(twice, lin.weight.grad)
    torch.testing.assert_close(once, lin.weight.grad)


def test_other_cases_take_the_module_itself():
    lin, x, buf = _layer(), torch.randn(4, 12), GradBuffer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(lin, x, buf)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() != "_LinearBackward"
    with torch.no_grad():
        assert linear(lin, x, buf).grad_fn is None
    assert linear(lin, x, buf).grad_fn.name() == "_LinearBackward"
    assert linear(lin.double(), x.double(), buf).grad_fn.name() != "_LinearBackward"


@pytest.mark.parametrize("model_cls", [BertForPreTraining, GPT])
def test_models_train_the_same_with_buffers_and_release_them(model_cls, monkeypatch):
    torch.manual_seed(0)
    model = model_cls(tiny_bert() if model_cls is BertForPreTraining else tiny_gpt()).eval()
    ids = torch.randint(1, 50, (2, 12))  # (B, T)
    labels = torch.where(torch.rand(2, 12) < 0.4, ids, torch.full_like(ids, -100))
    kw = {"labels": labels if model_cls is BertForPreTraining else ids}
    runs = []
    for plain in (False, False, True):  # the second run reuses the first's buffers
        if plain:
            monkeypatch.setattr("fastllm.nn.linear._fast", lambda module, x: False)
        model.zero_grad(set_to_none=True)
        model(ids, **kw).loss.backward()
        runs.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, g in runs[2].items():
        torch.testing.assert_close(runs[0][name], g, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(runs[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    copy.deepcopy(model), pickle.loads(pickle.dumps(model))  # buffers are not copied
    release_grad_buffers(model)
    assert all(b._buf is None for m in model.modules() for b in vars(m).get("_grads", {}).values())


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_linear_recomputes_the_activation_instead_of_saving_it(approximate):
    from fastllm.nn.linear import gelu_linear

    lin, u = _layer(), torch.randn(3, 5, 12)

    def run(fast: bool):
        lin.zero_grad(set_to_none=True)
        uu = u.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = gelu_linear(lin, uu, GradBuffer(), approximate) if fast else lin(F.gelu(uu, approximate=approximate))
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum().backward()
        activations = sum(n for n in saved if n == u.numel())  # tensors of u's size (not weights, not biases)
        return [y, uu.grad, lin.weight.grad, lin.bias.grad], activations

    (got, saved_fast), (want, saved_plain) = run(True), run(False)
    for g, w in zip(got, want):  # the same products, the activation recomputed bit for bit: fp32 GEMM rounding
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert saved_fast == u.numel() and saved_plain == 2 * u.numel()  # u only, against u and gelu(u)


@pytest.mark.parametrize("bias", [True, False])
def test_row_split_linear_equals_two_sliced_linears_and_reuses_its_buffer(bias):
    lin, buf, n = _layer(bias), GradBuffer(), 3
    xa, xb = torch.randn(2, 4, 12), torch.randn(2, 9, 12)

    def run(fast: bool):
        lin.zero_grad(set_to_none=True)
        a, b = xa.clone().requires_grad_(True), xb.clone().requires_grad_(True)
        w, bb = lin.weight, lin.bias
        ba, bb_ = (None, None) if bb is None else (bb[:n], bb[n:])
        ya, yb = row_split_linear(lin, a, b, n, buf) if fast else (F.linear(a, w[:n], ba), F.linear(b, w[n:], bb_))
        (ya.sin().sum() + (yb * yb).sum()).backward()
        return ya, yb, a.grad, b.grad, lin.weight.grad, None if bb is None else lin.bias.grad

    want = run(False)
    for _ in range(2):  # the second step writes the first step's (dropped) buffer again
        got = run(True)
        for g, w in zip(got, want):
            if w is None:
                assert g is None
            else:  # the same GEMMs on the same operands, row blocks written separately: fp32 rounding only
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        assert lin.weight.grad.data_ptr() == buf._buf.data_ptr()
