"""fastllm.nn.heads.VocabLoss: on the cpu backend in eager fp32 training, the weight gradient lands in a buffer
reused across steps (linear_cross_entropy_into); every gradient equals the plain autograd path, and a gradient
someone still holds is never overwritten."""
import pytest
import torch

from fastllm.nn.heads import VocabLoss
from fastllm.nn.linear import release_grad_buffers
from fastllm.ops import backends

pytestmark = pytest.mark.skipif("cpu" not in backends.available("linear_cross_entropy", "cpu"),
                                reason="the C++ extension did not build")


def _leaves(seed=0, v=97, hdim=16, n=20):
    g = torch.Generator().manual_seed(seed)
    h, w, b = torch.randn(n, hdim, generator=g), torch.randn(v, hdim, generator=g), torch.randn(v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    return [t.requires_grad_(True) for t in (h, w, b)], labels


def _step(loss_fn, leaves, labels, scale=1.0, zero=True):
    h, w, b = leaves
    if zero:
        for t in leaves:
            t.grad = None
    (loss_fn(h, w, labels, b) * scale).backward()
    return [t.grad for t in leaves]


def _plain():
    loss = VocabLoss()
    loss._buffered = lambda *a: False  # the autograd path of fastllm.ops.linear_cross_entropy
    return loss


def _close(got, want):
    # the same kernel and GEMMs, the first grad_weight chunk written with beta 0 instead of added to zeros
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_gradients_equal_the_plain_path_and_the_buffer_is_reused(scale):
    leaves, labels = _leaves()
    fast, plain = VocabLoss(), _plain()
    want = [g.clone() for g in _step(plain, leaves, labels, scale)]
    ptrs = []
    for _ in range(3):
        got = _step(fast, leaves, labels, scale)
        _close(got, want)
        ptrs.append(got[1].data_ptr())
        got = None
        leaves[1].grad = None  # zero_grad(set_to_none=True): the buffer is free again
    if scale == 1.0:  # a scaled loss multiplies out of place; a plain backward hands the buffer itself over
        assert ptrs[0] == ptrs[1] == ptrs[2] == fast._grad._buf.data_ptr()


def test_a_kept_gradient_is_never_overwritten():
    leaves, labels = _leaves()
    fast = VocabLoss()
    kept = _step(fast, leaves, labels)[1]  # the user keeps .grad (not a copy)
    before = kept.clone()
    _, labels2 = _leaves(seed=1)
    new = _step(fast, leaves, labels2)[1]
    torch.testing.assert_close(kept, before, rtol=0, atol=0)
    assert new.data_ptr() != kept.data_ptr()


def test_gradient_accumulation_and_retain_graph_add_up():
    leaves, labels = _leaves()
    fast, plain = VocabLoss(), _plain()
    want = [g.clone() for g in _step(plain, leaves, labels)]
    _step(fast, leaves, labels)
    got = _step(fast, leaves, labels, zero=False)  # .grad kept: AccumulateGrad adds the second gradient
    _close(got, [2 * g for g in want])
    for t in leaves:
        t.grad = None
    h, w, b = leaves
    loss = fast(h, w, labels, b)
    loss.backward(retain_graph=True)
    loss.backward()  # the saved gradients handed out twice: W.grad = 2 g, not g overwritten
    _close([t.grad for t in leaves], [2 * g for g in want])


def test_several_forwards_before_their_backwards_keep_their_gradients():
    """Pipeline micro-batches or two loss terms: a second forward must not reuse the buffer that the first one's
    backward still has to hand over."""
    (h, w, b), labels = _leaves()
    _, labels2 = _leaves(seed=1)
    fast, plain = VocabLoss(), _plain()
    want = [g.clone() for g in _step(plain, [h, w, b], labels)]
    want2 = [g.clone() for g in _step(plain, [h, w, b], labels2)]
    for t in (h, w, b):
        t.grad = None
    first, second = fast(h, w, labels, b), fast(h, w, labels2, b)
    second.backward()
    first.backward()
    _close([t.grad for t in (h, w, b)], [x + y for x, y in zip(want, want2)])


def test_falls_back_without_grad_or_in_other_dtypes():
    (h, w, b), labels = _leaves()
    fast = VocabLoss()
    with torch.no_grad():
        assert not fast._buffered(h, w)
        torch.testing.assert_close(fast(h, w, labels, b), _plain()(h, w, labels, b))
    assert not fast._buffered(h.double(), w.double())
    assert fast._buffered(h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast._buffered(h, w)


def test_release_frees_the_buffer():
    leaves, labels = _leaves()
    fast = VocabLoss()
    _step(fast, leaves, labels)
    assert fast._grad._buf is not None
    release_grad_buffers(fast)
    assert fast._grad._buf is None
