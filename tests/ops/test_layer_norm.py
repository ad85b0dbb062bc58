"""fastllm.ops.layer_norm against a float64 reference, for every backend this machine has.

Rule (ARCHITECTURE.md): max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + atol, for the output,
the returned h and every gradient (dx, dresidual, dweight, dbias), on fresh random inputs.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastllm.nn
from fastllm.ops import backends, layer_norm, reference
from tests.ops.tolerance import assert_close_ratio, default_atol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [1, 7, 127, 768, 1023, 4097]
ROWS = [1, 3, 1000]
AFFINE = ["wb", "w", "none"]


def _cpu_backends() -> list[str]:
    """The fused backends this machine runs on CPU tensors (tests/test_extension.py fails if one that CI
    expects is missing, so a backend that did not install is never silently untested)."""
    return [b for b in backends.available("layer_norm", "cpu") if b != "reference"]


def _make(rows, n, dtype, affine, with_res, device="cpu"):
    g = torch.Generator().manual_seed(rows * 10007 + n)
    rnd = (lambda *s: (torch.randn(*s, generator=g) * 2 + 0.5).to(device=device, dtype=dtype))
    x = rnd(rows, n)
    w = rnd(n) if affine in ("wb", "w") else None
    b = rnd(n) if affine == "wb" else None
    r = rnd(rows, n) if with_res else None
    return x, w, b, r


def _torch_path(x, w, b, r, eps):
    """What plain PyTorch computes in the same dtype (the error baseline)."""
    h = x if r is None else x + r
    y = F.layer_norm(h, (x.shape[-1],), w, b, eps)
    return y, h


def _grads(fn, inputs, dy, dh):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y, h = fn(*leaves)
    loss = (y * dy.to(y.dtype)).sum()
    if leaves[3] is not None:
        loss = loss + (h * dh.to(h.dtype)).sum()
    loss.backward()
    return (y, h), [t.grad if t is not None else None for t in leaves]


def check_layer_norm(backend, rows, n, dtype, affine, with_res, device="cpu", eps=1e-5):
    x, w, b, r = _make(rows, n, dtype, affine, with_res, device)
    dy, dh = torch.randn(rows, n).to(device), torch.randn(rows, n).to(device)

    def run(fn):
        return lambda x_, w_, b_, r_: (fn(x_, w_, b_, r_) if r_ is not None else (fn(x_, w_, b_, None), x_))

    kern = run(lambda *a: layer_norm(*a[:3], eps, a[3], backend=backend))
    ref = run(lambda *a: reference.layer_norm(*a[:3], eps, a[3]))
    (y, h), g = _grads(kern, (x, w, b, r), dy, dh)
    (y64, h64), g64 = _grads(ref, [t.double() if t is not None else None for t in (x, w, b, r)], dy, dh)
    (yt, ht), gt = _grads(lambda *a: _torch_path(*a, eps), (x, w, b, r), dy, dh)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_ratio("y", y, yt, y64, default_atol(y64, dtype))
    assert_close_ratio("h", h, ht, h64, default_atol(h64, dtype))
    for name, a, at, a64 in zip(("dx", "dweight", "dbias", "dresidual"), g, gt, g64):
        if a64 is None:
            assert a is None, name
            continue
        terms = rows if name in ("dweight", "dbias") else n  # length of the sums behind each gradient
        assert_close_ratio(name, a, at, a64, default_atol(a64, dtype, terms))


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_float64_reference(backend, dtype, n, rows):
    if backend == "triton" and rows * n > 2_000_000:
        pytest.skip("the Triton interpreter is too slow for this size on CPU; scripts/gpu_check.sh runs it")
    for affine in AFFINE:
        for with_res in (False, True):
            check_layer_norm(backend, rows, n, dtype, affine, with_res)


@pytest.mark.parametrize("backend", _cpu_backends() + ["reference"])
def test_leading_dims_and_non_contiguous(backend):
    x = torch.randn(4, 64, 6).transpose(1, 2)  # (4, 6, 64) non-contiguous
    w, b = torch.randn(64), torch.randn(64)
    y = layer_norm(x, w, b, backend=backend)
    torch.testing.assert_close(y, F.layer_norm(x, (64,), w, b), rtol=1e-5, atol=1e-5)


def test_float64_auto_uses_reference_and_explicit_native_refuses():
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x), F.layer_norm(x, (8,)))
    with pytest.raises(TypeError, match="float64"):
        layer_norm(x, backend="cpu")


@pytest.mark.parametrize("backend", _cpu_backends() + ["reference"])
@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("weight_size", ValueError, r"weight has shape \(5,\) but expected \(8,\)"),
        ("dtype_mismatch", TypeError, "bias has dtype torch.float16"),
        ("residual_shape", ValueError, "residual has shape"),
        ("empty", ValueError, "non-empty"),
        ("eps", ValueError, "eps must be > 0"),
        ("integer", TypeError, "floating"),
        ("device", ValueError, "is on meta"),
    ],
)
def test_bad_inputs(backend, case, exc, match):
    x, w, b, r, eps = torch.randn(4, 8), torch.randn(8), torch.randn(8), None, 1e-5
    if case == "weight_size":
        w = torch.randn(5)
    elif case == "dtype_mismatch":
        b = b.half()
    elif case == "residual_shape":
        r = torch.randn(4, 7)
    elif case == "empty":
        x = torch.randn(0, 8)
    elif case == "eps":
        eps = 0.0
    elif case == "integer":
        x = torch.ones(4, 8, dtype=torch.int64)
    elif case == "device":
        w = torch.randn(8, device="meta")
    with pytest.raises(exc, match=match):
        layer_norm(x, w, b, eps, r, backend=backend)


def test_cpp_boundary_checks_name_the_argument():
    """Direct callers of the dispatcher op get the C++ checks (not just the Python ones)."""
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(8,\)"):
        torch.ops.fastllm.layer_norm_fwd(x, torch.randn(3), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.fastllm.layer_norm_fwd(x.t(), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        torch.ops.fastllm.layer_norm_fwd(x, None, None, None, -1.0)


def _opcheck_args(dtype=torch.float32):
    x, w, b, r = _make(5, 33, dtype, "wb", True)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), r.requires_grad_(True)
    return x, w, b, r


def test_opcheck_native():
    x, w, b, r = _opcheck_args()
    torch.library.opcheck(torch.ops.fastllm.layer_norm_fwd.default, (x, w, b, r, 1e-5))
    torch.library.opcheck(torch.ops.fastllm.layer_norm_fwd.default, (x, None, None, None, 1e-5))
    y, h, mean, rstd = torch.ops.fastllm.layer_norm_fwd(x.detach(), w.detach(), b.detach(), r.detach(), 1e-5)
    args = (torch.randn_like(y), torch.randn_like(h), h, w.detach(), mean, rstd, True)
    torch.library.opcheck(torch.ops.fastllm.layer_norm_bwd.default, args)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_opcheck_triton():
    from fastllm.kernels import layer_norm as kernel

    kernel.layer_norm_fwd_op()
    x, w, b, r = _opcheck_args()
    torch.library.opcheck(torch.ops.fastllm.layer_norm_fwd_triton.default, (x, w, b, r, 1e-5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    ln = fastllm.nn.LayerNorm(48)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()

    def block(x, r):
        y, h = ln(x, r)
        return (y * 2).relu(), h

    compiled = torch.compile(block, fullgraph=True)
    x, r = torch.randn(6, 48, requires_grad=True), torch.randn(6, 48, requires_grad=True)
    y, h = compiled(x, r)
    y_ref, h_ref = block(x, r)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    (y.sum() + h.pow(2).sum()).backward()
    gx = x.grad.clone()
    x.grad = None
    (y_ref.sum() + h_ref.pow(2).sum()).backward()
    torch.testing.assert_close(gx, x.grad)


def test_auto_selects_cpu_kernel():
    assert backends.select("layer_norm", "cpu") == "cpu"


def _cuda_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b for b in backends.available("layer_norm", "cuda") if b != "reference"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_cuda_matches_float64_reference(dtype, n, rows):
    names = _cuda_backends()
    assert "cuda" in names, f"fastllm._C has no CUDA kernels on this GPU machine (available: {names})"
    for backend in names:
        for affine in AFFINE:
            for with_res in (False, True):
                check_layer_norm(backend, rows, n, dtype, affine, with_res, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_cuda_opcheck_and_misaligned_input():
    x, w, b, r = (t.cuda() for t in _opcheck_args(torch.bfloat16))
    torch.library.opcheck(torch.ops.fastllm.layer_norm_fwd.default, (x, w, b, r, 1e-5))
    base = torch.randn(4 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    xm = base[1:].view(4, 64)  # offset by one element: not 16-byte aligned, takes the scalar path
    torch.testing.assert_close(layer_norm(xm, backend="cuda"), F.layer_norm(xm, (64,)), rtol=2e-2, atol=2e-2)
