"""fastllm.ops.cross_entropy / linear_cross_entropy against a float64 reference, for every backend this machine has.

Rule (ARCHITECTURE.md): max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + atol, for the loss and every
gradient (logits; hidden, weight, bias), on fresh random inputs. torch_same_dtype is F.cross_entropy (after
F.linear for the linear op) in the input dtype. Every V in {1, 7, 1000, 30522, 50257} and N in {1, 5, 608, 2049}
appears; the large vocabularies only with few rows, and the Triton interpreter only on small shapes.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fastllm.ops import backends, cross_entropy, linear_cross_entropy, reference
from fastllm.ops.cross_entropy import linear_cross_entropy_into
from tests.ops.tolerance import assert_close_ratio, default_atol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
# (label_smoothing, fraction of rows labelled ignore_index): none, some and (in test_all_ignored) all ignored.
OPTIONS = [(0.0, 0.0), (0.1, 0.3), (0.0, 0.5), (1.0, 0.0)]
CE_SHAPES = [(1, 7), (5, 1), (5, 1000), (608, 1000), (2049, 7), (2049, 1000), (1, 50257), (5, 30522)]
LCE_SHAPES = [(1, 16, 7), (5, 24, 1), (608, 32, 1000), (2049, 16, 1000), (5, 32, 30522), (1, 16, 50257)]
TRITON_MAX_ELEMS = 40_000  # logits per test case that the Triton interpreter runs in a few seconds


def _cpu_backends(op: str) -> list[str]:
    """The fused backends this machine runs on CPU tensors (tests/test_extension.py fails if one that CI
    expects is missing, so a backend that did not install is never silently untested)."""
    return [b for b in backends.available(op, "cpu") if b != "reference"]


def _labels(n, v, frac, ignore_index, g, device):
    labels = torch.randint(0, v, (n,), generator=g)  # (N,)
    labels[torch.rand(n, generator=g) < frac] = ignore_index
    return labels.to(device)


def _grad_out(loss, g):
    """A random positive upstream gradient of the loss's shape (not all ones, so scaling bugs show)."""
    return (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.device)


def _run(fn, inputs, gout):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    loss = fn(*leaves)
    loss.backward(gout.to(loss.dtype))
    return loss, [t.grad if t is not None else None for t in leaves]


def check_ce(backend, n, v, dtype, reduction, smoothing, frac, device="cpu", ignore_index=-100):
    g = torch.Generator().manual_seed(n * 7919 + v)
    logits = (torch.randn(n, v, generator=g) * 3).to(device=device, dtype=dtype)  # (N, V)
    labels = _labels(n, v, frac, ignore_index, g, device)  # (N,)
    kw = {"ignore_index": ignore_index, "label_smoothing": smoothing, "reduction": reduction}
    loss64 = reference.cross_entropy(logits.double(), labels, ignore_index, smoothing, reduction)
    gout = _grad_out(loss64, g)
    got, (glog,) = _run(lambda x: cross_entropy(x, labels, backend=backend, **kw), [logits], gout)
    ref, (glog64,) = _run(lambda x: reference.cross_entropy(x, labels, ignore_index, smoothing, reduction),
                          [logits.double()], gout)
    tor, (glogt,) = _run(lambda x: F.cross_entropy(x, labels, **kw), [logits], gout)
    assert got.dtype == dtype and got.shape == tor.shape
    # The loss sums V exponentials per row (logsumexp) and N rows per reduction: sqrt(V + N) roundoffs.
    assert_close_ratio("loss", got, tor, ref, default_atol(ref, dtype, v + n))
    # Each gradient entry is exp(x - lse) with lse a V-term sum: sqrt(V) roundoffs of the largest entry.
    assert_close_ratio("grad_logits", glog, glogt, glog64, default_atol(glog64, dtype, v))


def _torch_linear_ce(h, w, b, labels, **kw):
    return F.cross_entropy(F.linear(h, w, b), labels, **kw)


def check_lce(backend, n, hdim, v, dtype, reduction, smoothing, frac, with_bias, chunk=None, device="cpu"):
    g = torch.Generator().manual_seed(n * 104729 + v * 31 + hdim)
    rnd = (lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(device=device, dtype=dtype))
    h, w = rnd(n, hdim), rnd(v, hdim, sc=hdim**-0.5)  # (N, H), (V, H): logits ~ N(0, 1)
    b = rnd(v) if with_bias else None  # (V,)
    labels = _labels(n, v, frac, -100, g, device)  # (N,)
    kw = {"label_smoothing": smoothing, "reduction": reduction}
    ref_fn = (lambda h_, w_, b_: reference.linear_cross_entropy(h_, w_, labels, b_, -100, smoothing, reduction))
    loss64 = ref_fn(h.double(), w.double(), b.double() if b is not None else None)
    gout = _grad_out(loss64, g)
    got, grads = _run(lambda h_, w_, b_: linear_cross_entropy(h_, w_, labels, bias=b_, chunk_size=chunk,
                                                              backend=backend, **kw), [h, w, b], gout)
    ref, grads64 = _run(ref_fn, [t.double() if t is not None else None for t in (h, w, b)], gout)
    tor, gradst = _run(lambda h_, w_, b_: _torch_linear_ce(h_, w_, b_, labels, **kw), [h, w, b], gout)
    assert got.dtype == dtype and got.shape == tor.shape
    # Loss: H-term dot products, V-term logsumexp, N-term reduction.
    assert_close_ratio("loss", got, tor, ref, default_atol(ref, dtype, hdim + v + n))
    # grad_hidden sums V terms per entry; grad_weight and grad_bias sum over the N rows.
    for name, a, at, a64, terms in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, gradst, grads64,
                                       (v, n, n)):
        if a64 is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert_close_ratio(name, a, at, a64, default_atol(a64, dtype, terms))


def _combos(elems: int, backend: str):
    """(reduction, (smoothing, ignored fraction), with_bias): every combination on small problems; on large
    ones (smaller for the slow Triton interpreter) each reduction and each option once (the small shapes
    already cover every pairing)."""
    if elems <= (2_000 if backend == "triton" else 20_000):
        return [(r, o, i % 2 == 0) for r in REDUCTIONS for i, o in enumerate(OPTIONS)]
    return [(REDUCTIONS[i % 3], o, i % 2 == 0) for i, o in enumerate(OPTIONS)]


def _too_big_for_interpreter(backend, elems):
    return backend == "triton" and elems > TRITON_MAX_ELEMS and not torch.cuda.is_available()


@pytest.mark.parametrize("backend", _cpu_backends("cross_entropy"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, v", CE_SHAPES)
def test_cross_entropy_matches_float64_reference(backend, dtype, n, v):
    if _too_big_for_interpreter(backend, n * v):
        pytest.skip("the Triton interpreter is too slow for this size on CPU; scripts/gpu_check.sh runs it")
    for reduction, (smoothing, frac), _ in _combos(n * v, backend):
        check_ce(backend, n, v, dtype, reduction, smoothing, frac)


@pytest.mark.parametrize("backend", _cpu_backends("cross_entropy"))
def test_cross_entropy_in_range_ignore_index(backend):
    """ignore_index may be a real class id (here 3): those rows are left out, the others keep class 3 usable."""
    for reduction in REDUCTIONS:
        check_ce(backend, 64, 10, torch.float32, reduction, 0.1, 0.2, ignore_index=3)


@pytest.mark.parametrize("backend", _cpu_backends("linear_cross_entropy"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, hdim, v", LCE_SHAPES)
def test_linear_cross_entropy_matches_float64_reference(backend, dtype, n, hdim, v):
    if _too_big_for_interpreter(backend, n * v):
        pytest.skip("the Triton interpreter is too slow for this size on CPU; scripts/gpu_check.sh runs it")
    for reduction, (smoothing, frac), with_bias in _combos(n * v, backend):
        check_lce(backend, n, hdim, v, dtype, reduction, smoothing, frac, with_bias)
    check_lce(backend, n, hdim, v, dtype, "mean", 0.1, 0.3, with_bias=True, chunk=max(1, n // 3))


@pytest.mark.parametrize("backend", _cpu_backends("linear_cross_entropy") + ["reference"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(backend, reduction):
    """As torch: mean is 0/0 = nan, sum is 0, none is zeros; every gradient is exactly zero."""
    h, w, b = torch.randn(6, 8), torch.randn(11, 8), torch.randn(11)
    labels = torch.full((6,), -100)
    for smoothing in (0.0, 0.2):
        kw = {"label_smoothing": smoothing, "reduction": reduction}
        ref = _torch_linear_ce(h, w, b, labels, **kw)
        got, grads = _run(lambda h_, w_, b_, kw=kw: linear_cross_entropy(h_, w_, labels, bias=b_, backend=backend,
                                                                         **kw), [h, w, b], torch.ones(ref.shape))
        torch.testing.assert_close(got, ref, equal_nan=True)
        for gr in grads:
            assert torch.equal(gr, torch.zeros_like(gr))
        logits = torch.randn(6, 11, requires_grad=True)
        out = cross_entropy(logits, labels, backend=backend, **kw)
        torch.testing.assert_close(out, F.cross_entropy(logits, labels, **kw), equal_nan=True)
        out.backward(torch.ones_like(out))
        assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", _cpu_backends("linear_cross_entropy"))
def test_chunked_equals_unchunked(backend):
    """Chunking changes only the order of the fp32 sums over rows in grad_weight/grad_bias: equal to a few
    fp32 roundoffs (rtol 1e-5); the loss and grad_hidden are row-wise and agree as closely."""
    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(40, 24, generator=g), torch.randn(300, 24, generator=g), torch.randn(300, generator=g)
    labels = _labels(40, 300, 0.2, -100, g, "cpu")

    def run(chunk):
        return _run(lambda h_, w_, b_: linear_cross_entropy(h_, w_, labels, bias=b_, chunk_size=chunk,
                                                            label_smoothing=0.1, backend=backend), [h, w, b],
                    torch.ones(()))

    full_loss, full_grads = run(40)
    for chunk in (3, 7, 64):
        loss, grads = run(chunk)
        torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
        for a, ref in zip(grads, full_grads):
            torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)


def _into_case(n=40, v=300, hdim=24, frac=0.2, seed=5):
    g = torch.Generator().manual_seed(seed)
    h, w, b = torch.randn(n, hdim, generator=g), torch.randn(v, hdim, generator=g), torch.randn(v, generator=g)
    return h, w, b, _labels(n, v, frac, -100, g, "cpu")


@pytest.mark.skipif("cpu" not in _cpu_backends("linear_cross_entropy"), reason="the C++ extension did not build")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [None, 3, 7])
@pytest.mark.parametrize("with_bias", [True, False])
def test_into_equals_autograd_gradients_whatever_the_buffer_held(reduction, chunk, with_bias):
    """The same kernel, except that the first chunk writes grad_weight (a beta-0 GEMM) where the autograd path
    adds it into zeros: equal up to the order of fp32 sums inside the GEMMs (rtol 1e-5). The buffer starts as
    NaN, so a stale entry that was added to instead of overwritten would show."""
    h, w, b, labels = _into_case()
    b = b if with_bias else None
    kw = {"label_smoothing": 0.1, "reduction": reduction, "chunk_size": chunk}
    gw = torch.full_like(w, float("nan"))
    loss, gh, gb = linear_cross_entropy_into(h, w, labels, gw, bias=b, **kw)
    ref, (rgh, rgw, rgb) = _run(lambda h_, w_, b_: linear_cross_entropy(h_, w_, labels, bias=b_, backend="cpu", **kw),
                                [h, w, b], torch.ones(()))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for got, want in ((gh, rgh), (gw, rgw), (gb, rgb)):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cpu" not in _cpu_backends("linear_cross_entropy"), reason="the C++ extension did not build")
def test_into_with_every_row_ignored_zeroes_the_buffer():
    h, w, b, labels = _into_case(frac=1.0)
    gw = torch.full_like(w, float("nan"))
    loss, gh, gb = linear_cross_entropy_into(h, w, labels, gw, bias=b, reduction="sum")
    assert float(loss) == 0.0
    for t in (gh, gw, gb):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.skipif("cpu" not in _cpu_backends("linear_cross_entropy"), reason="the C++ extension did not build")
@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "grad_weight": a["grad_weight"][:-1]}, "grad_weight must be a contiguous float32"),
    (lambda a: {**a, "grad_weight": a["grad_weight"].double()}, "grad_weight must be a contiguous float32"),
    (lambda a: {**a, "grad_weight": a["grad_weight"].t().contiguous().t()}, "grad_weight must be a contiguous"),
    (lambda a: {**a, "grad_weight": "buffer"}, "got str"),
    (lambda a: {**a, "reduction": "none"}, "reduction 'mean' or 'sum'"),
    (lambda a: {**a, "weight": a["weight"].half(), "hidden": a["hidden"].half()}, "CPU float32 only"),
])
def test_into_bad_arguments(change, match):
    h, w, _, labels = _into_case()
    args = change({"hidden": h, "weight": w, "labels": labels, "grad_weight": torch.empty_like(w),
                   "reduction": "mean"})
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy_into(**args)


@pytest.mark.skipif("cpu" not in _cpu_backends("linear_cross_entropy"), reason="the C++ extension did not build")
def test_into_cpp_checks_name_the_argument():
    h, w, b, labels = _into_case()
    op = torch.ops.fastllm.linear_cross_entropy_fwd_into
    with pytest.raises(RuntimeError, match="grad_weight must have shape"):
        op(h, w, b, labels, -100, 0.0, 1, 8, torch.empty(3, 24))
    with pytest.raises(RuntimeError, match="reduction 1 \\(mean\\) or 2 \\(sum\\)"):
        op(h, w, b, labels, -100, 0.0, 0, 8, torch.empty_like(w))
    with pytest.raises(RuntimeError, match="grad_weight must be float32"):
        op(h, w, b, labels, -100, 0.0, 1, 8, torch.empty_like(w, dtype=torch.float64))


def test_auto_chunk_size_bounds_the_logits():
    from fastllm.ops.cross_entropy import auto_chunk_size

    assert auto_chunk_size(4096, 30522, "cpu") == 512  # 512 x 30522 fp32 = 60 MiB
    assert auto_chunk_size(8192, 50257, "cpu") == 256
    assert auto_chunk_size(5, 30522, "cpu") == 5
    assert auto_chunk_size(10**6, 7, "cpu") == 4096
    assert auto_chunk_size(100, 10**9, "cpu") == 16


def test_float64_auto_uses_reference_and_explicit_native_refuses():
    x, labels = torch.randn(3, 8, dtype=torch.float64), torch.tensor([1, 2, -100])
    torch.testing.assert_close(cross_entropy(x, labels), F.cross_entropy(x, labels))
    with pytest.raises(TypeError, match="float64"):
        cross_entropy(x, labels, backend="cpu")


BAD_CASES = [
    ("label_high", ValueError, r"labels\[1\] = 11 is out of range \[0, 11\)"),
    ("label_negative", ValueError, r"labels\[0\] = -5 is out of range"),
    ("labels_shape", ValueError, r"labels has shape \(5,\) but expected \(4,\)"),
    ("labels_float", TypeError, "labels must be int64"),
    ("integer_input", TypeError, "must be a floating tensor"),
    ("reduction", ValueError, "reduction must be one of"),
    ("smoothing", ValueError, r"label_smoothing must be in \[0, 1\]"),
    ("weight_shape", ValueError, r"weight has shape \(11, 7\) but expected \(11, 8\)"),
    ("bias_shape", ValueError, r"bias has shape \(3,\) but expected \(11,\)"),
    ("chunk", ValueError, "chunk_size must be a positive int"),
]


def _bad_args(case):
    x, w, b, labels = torch.randn(4, 8), torch.randn(11, 8), torch.randn(11), torch.tensor([1, 2, 3, -100])
    kw = {}
    if case == "label_high":
        labels[1] = 11
    elif case == "label_negative":
        labels[0] = -5
    elif case == "labels_shape":
        labels = torch.zeros(5, dtype=torch.int64)
    elif case == "labels_float":
        labels = labels.float()
    elif case == "integer_input":
        x = torch.ones(4, 8, dtype=torch.int64)
    elif case == "reduction":
        kw["reduction"] = "avg"
    elif case == "smoothing":
        kw["label_smoothing"] = 1.5
    elif case == "weight_shape":
        w = torch.randn(11, 7)
    elif case == "bias_shape":
        b = torch.randn(3)
    elif case == "chunk":
        kw["chunk_size"] = 0
    return x, w, b, labels, kw


@pytest.mark.parametrize("backend", _cpu_backends("linear_cross_entropy") + ["reference"])
@pytest.mark.parametrize("case, exc, match", BAD_CASES)
def test_bad_inputs(backend, case, exc, match):
    x, w, b, labels, kw = _bad_args(case)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(x, w, labels, bias=b, backend=backend, **kw)
    if case in ("weight_shape", "bias_shape", "chunk"):
        return
    kw.pop("chunk_size", None)
    logits = x @ w.t() if x.is_floating_point() else x.new_ones(4, 11)  # (4, 11)
    with pytest.raises(exc, match=match.replace("hidden", "logits")):
        cross_entropy(logits, labels, backend=backend, **kw)


def test_cpp_boundary_checks_name_the_argument():
    """Direct callers of the dispatcher ops get the C++ checks (not just the Python ones)."""
    ops = torch.ops.fastllm
    x, labels = torch.randn(4, 8), torch.tensor([1, 2, 3, 0])
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 9 is out of range \[0, 8\)"):
        ops.cross_entropy_fwd(x, torch.tensor([1, 2, 9, 0]), -100, 0.0)
    with pytest.raises(RuntimeError, match=r"labels must have shape \(4,\)"):
        ops.cross_entropy_fwd(x, labels[:3], -100, 0.0)
    with pytest.raises(RuntimeError, match="labels has dtype Int"):
        ops.cross_entropy_fwd(x, labels.int(), -100, 0.0)
    with pytest.raises(RuntimeError, match="logits must be contiguous"):
        ops.cross_entropy_fwd(torch.randn(8, 4).t(), labels, -100, 0.0)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be in \[0, 1\]"):
        ops.cross_entropy_fwd(x, labels, -100, -0.1)
    w = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(V, 8\)"):
        ops.linear_cross_entropy_fwd(x, torch.randn(8, 5), None, labels, -100, 0.0, 1, 64, True)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(8,\)"):
        ops.linear_cross_entropy_fwd(x, w, torch.randn(3), labels, -100, 0.0, 1, 64, True)
    with pytest.raises(RuntimeError, match="reduction must be 0"):
        ops.linear_cross_entropy_fwd(x, w, None, labels, -100, 0.0, 5, 64, True)
    with pytest.raises(RuntimeError, match=r"labels\[0\] = 8 is out of range"):
        ops.linear_cross_entropy_fwd(x, w, None, torch.tensor([8, 0, 0, 0]), -100, 0.0, 1, 64, True)
    with pytest.raises(RuntimeError, match="chunk_size must be > 0"):
        ops.linear_cross_entropy_fwd(x, w, None, labels, -100, 0.0, 1, 0, True)


def _opcheck_inputs():
    g = torch.Generator().manual_seed(3)
    h, w, b = torch.randn(9, 12, generator=g), torch.randn(37, 12, generator=g), torch.randn(37, generator=g)
    labels = torch.tensor([0, 5, -100, 36, 7, -100, 1, 2, 3])
    return [t.requires_grad_(True) for t in (h, w, b)], labels


def _opcheck_all(ce_fwd, ce_bwd, lce_fwd, lce_bwd, **kw):
    (h, w, b), labels = _opcheck_inputs()
    logits = (h @ w.t()).detach().requires_grad_(True)  # (9, 37)
    torch.library.opcheck(ce_fwd, (logits, labels, -100, 0.1), **kw)
    _, lse = ce_fwd(logits.detach(), labels, -100, 0.1)
    torch.library.opcheck(ce_bwd, (torch.rand(9), logits.detach(), labels, lse, -100, 0.1), **kw)
    for red in (0, 1, 2):
        torch.library.opcheck(lce_fwd, (h, w, b, labels, -100, 0.1, red, 4, True), **kw)
    torch.library.opcheck(lce_fwd, (h, w, None, labels, -100, 0.0, 1, 64, False), **kw)
    torch.library.opcheck(lce_bwd, (torch.rand(9), h.detach(), w.detach(), b.detach(), labels, -100, 0.1, 4), **kw)


def test_opcheck_native():
    ops = torch.ops.fastllm
    _opcheck_all(ops.cross_entropy_fwd.default, ops.cross_entropy_bwd.default,
                 ops.linear_cross_entropy_fwd.default, ops.linear_cross_entropy_bwd.default)
    (h, w, b), labels = _opcheck_inputs()  # the _into op has no autograd formula: inputs without grad
    for red, bias in ((1, b.detach()), (2, None)):
        torch.library.opcheck(ops.linear_cross_entropy_fwd_into.default,
                              (h.detach(), w.detach(), bias, labels, -100, 0.1, red, 4, torch.empty_like(w.detach())))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_opcheck_triton():
    from fastllm.kernels import cross_entropy as kernel

    kernel.cross_entropy_fwd_op(), kernel.linear_cross_entropy_fwd_op()
    ops = torch.ops.fastllm
    _opcheck_all(ops.cross_entropy_fwd_triton.default, ops.cross_entropy_bwd_triton.default,
                 ops.linear_cross_entropy_fwd_triton.default, ops.linear_cross_entropy_bwd_triton.default,
                 test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _check_compiled_head(backend, plain_backend):
    """An MLM-style head: both ops inside one compiled graph, with gradients, equal to eager."""
    def head(h, w, b, labels):
        loss = linear_cross_entropy(h, w, labels, bias=b, label_smoothing=0.1, chunk_size=4, backend=backend)
        aux = cross_entropy(h @ w.t(), labels, reduction="sum", backend=plain_backend)
        return loss * 2 + aux / 100

    compiled = torch.compile(head, fullgraph=True)
    (h, w, b), labels = _opcheck_inputs()
    h, w, b, labels = (t.detach().to(DEVICE).requires_grad_(t.is_floating_point()) for t in (h, w, b, labels))
    out = compiled(h, w, b, labels)
    grads = torch.autograd.grad(out, (h, w, b))
    ref = head(h, w, b, labels)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_torch_compile_fullgraph():
    _check_compiled_head("auto", "auto")


@pytest.mark.skipif("triton" not in backends.available("linear_cross_entropy", DEVICE), reason="no triton")
def test_torch_compile_fullgraph_triton_linear():
    """The linear Triton op is a custom_op (opaque to inductor), so it compiles under the interpreter too."""
    _check_compiled_head("triton", "auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="inductor traces into the triton_op with fake tensors, which the CPU interpreter cannot "
                           "launch on; scripts/gpu_check.sh runs it on a GPU")
def test_torch_compile_fullgraph_triton_cuda():
    _check_compiled_head("triton", "triton")


def test_auto_selects_cpu_kernel():
    assert backends.select("cross_entropy", "cpu") == "cpu"
    assert backends.select("linear_cross_entropy", "cpu") == "cpu"


def _cuda_backends(op: str) -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b for b in backends.available(op, "cuda") if b != "reference"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, v", CE_SHAPES)
def test_cuda_cross_entropy_matches_float64_reference(dtype, n, v):
    names = _cuda_backends("cross_entropy")
    assert "cuda" in names, f"fastllm._C has no CUDA kernels on this GPU machine (available: {names})"
    for backend in names:
        for reduction in REDUCTIONS:
            for smoothing, frac in OPTIONS:
                check_ce(backend, n, v, dtype, reduction, smoothing, frac, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, hdim, v", LCE_SHAPES + [(608, 768, 30522)])
def test_cuda_linear_cross_entropy_matches_float64_reference(dtype, n, hdim, v):
    names = _cuda_backends("linear_cross_entropy")
    assert "cuda" in names, f"fastllm._C has no CUDA kernels on this GPU machine (available: {names})"
    for backend in names:
        for reduction in REDUCTIONS:
            for i, (smoothing, frac) in enumerate(OPTIONS):
                check_lce(backend, n, hdim, v, dtype, reduction, smoothing, frac, i % 2 == 0, device="cuda")
        check_lce(backend, n, hdim, v, dtype, "mean", 0.1, 0.3, True, chunk=max(1, n // 3), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_cuda_opcheck():
    ops = torch.ops.fastllm
    (h, w, b), labels = _opcheck_inputs()
    h, w, b = (t.detach().cuda().requires_grad_(True) for t in (h, w, b))
    torch.library.opcheck(ops.linear_cross_entropy_fwd.default, (h, w, b, labels.cuda(), -100, 0.1, 1, 4, True))
    logits = (h @ w.t()).detach().requires_grad_(True)
    torch.library.opcheck(ops.cross_entropy_fwd.default, (logits, labels.cuda(), -100, 0.1))
