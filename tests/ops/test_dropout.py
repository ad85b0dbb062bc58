"""fastllm.ops.dropout: every backend this machine has against the reference, bit for bit.

The op is a mask and one multiply, so the rule is stronger than ARCHITECTURE.md's error ratio: every backend
must give the reference's exact bits (output and gradient) for the same seed, in every dtype. The reference
itself is checked against the definition: kept values are x / (1 - p) to within 1 ulp, dropped values are 0,
and the kept fraction is 1 - p within a binomial band.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from fastllm.ops import backends, dropout, reference
from tests.ops.tolerance import EPS

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1,), (7,), (127,), (1023,), (4097,), (3, 5, 67)]
ULP_EPS = {**EPS, torch.float64: 2.0**-53}  # unit roundoff of each dtype


def _cpu_backends() -> list[str]:
    """The fused backends that run on CPU tensors here (tests/test_extension.py fails if an expected one is
    missing, so a backend that did not install is never silently untested)."""
    return [b for b in backends.available("dropout", "cpu") if b != "reference"]


def _skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes float32/bfloat16/float16 (test_triton_refuses_float64)")


def _x(shape, dtype, device="cpu", seed=0):
    """Fresh random input, never zero (so kept and dropped are told apart by y != 0)."""
    g = torch.Generator().manual_seed(seed + math.prod(shape))
    x = torch.randn(*shape, generator=g) * 3  # (*shape)
    x = torch.where(x == 0, torch.ones_like(x), x)
    return x.to(device=device, dtype=dtype)


def _run(fn, x, dout):
    """(y, x.grad) of fn on a fresh leaf copy of x, backpropagating dout."""
    leaf = x.detach().clone().requires_grad_(True)
    y = fn(leaf)
    y.backward(dout)
    return y.detach(), leaf.grad


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _scaled(t: torch.Tensor, p: float) -> torch.Tensor:
    """t * (1 / (1 - p)) as every backend computes it: in the compute dtype, scale rounded once, then cast."""
    ct = reference.dropout_compute_dtype(t.dtype)
    return (t.to(ct) * torch.tensor(1.0 / (1.0 - p), dtype=ct, device=t.device)).to(t.dtype)


# ------------------------------------------------------------------------------------------- bit identity
@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_bit_identical_to_reference(backend, dtype, shape, p):
    _skip_unsupported(backend, dtype)
    x, dout = _x(shape, dtype), _x(shape, dtype, seed=1)
    got = _run(lambda t: dropout(t, p, seed=2**40 + 123, backend=backend), x, dout)
    want = _run(lambda t: dropout(t, p, seed=2**40 + 123, backend="reference"), x, dout)
    for name, a, b in zip(("y", "dx"), got, want):
        assert _bits_equal(a, b), f"{name}: {backend} differs from the reference at {(a != b).sum()} elements"


def check_definition(y: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    """y is a valid dropout of x: dropped values are +0, kept ones x / (1 - p) to 1 ulp. Returns the mask."""
    keep = y != 0  # x is never 0 and x / (1 - p) cannot underflow, so y != 0 is exactly the keep mask
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep])) and not torch.signbit(y[~keep]).any()  # +0
    assert _bits_equal(y[keep], _scaled(x[keep], p))
    # 1 ulp: the scale is rounded once (<= u relative) and the product once more in the compute dtype, then
    # (bf16/fp16) once into the output dtype (<= u of that dtype): |y - x/(1-p)| <= 2u|x/(1-p)| + O(u^2), and
    # 2u|v| bounds the spacing of the dtype's floats at v, i.e. 1 ulp. The float64 oracle x / (1 - p) is itself
    # rounded once (+ u64), and (1 + 1e-6) absorbs the O(u^2) terms.
    exact = x[keep].double() / (1.0 - p)
    err = (y[keep].double() - exact).abs()
    bound = (2 * ULP_EPS[y.dtype] + ULP_EPS[torch.float64]) * exact.abs() * (1 + 1e-6)
    assert (err <= bound).all(), err.max()
    return keep


@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_values_and_gradient_follow_the_definition(backend, dtype, p):
    _skip_unsupported(backend, dtype)
    x, dout = _x((33, 65), dtype), _x((33, 65), dtype, seed=1)
    y, dx = _run(lambda t: dropout(t, p, seed=7, backend=backend), x, dout)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    keep = check_definition(y, x, p)
    # x.grad = mask / (1 - p) * dout, the mask taken from the forward output: the backward regenerated it.
    assert _bits_equal(dx, torch.where(keep, _scaled(dout, p), torch.zeros_like(dout)))


def test_reference_mask_is_the_documented_hash():
    """reference.dropout_mask spelled out once more with Python ints, for a few indices and a 64-bit seed."""
    seed, p, m32 = 0x1234_5678_9ABC_DEF0, 0.25, 0xFFFFFFFF

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & m32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & m32
        return h ^ (h >> 16)

    key = fmix((seed & m32) ^ fmix((seed >> 32) ^ reference.HASH_DROPOUT))
    thr = reference.dropout_threshold(p)
    mask = reference.dropout_mask(seed, 300, p)
    for n in (0, 1, 2, 17, 299):
        r = fmix(key ^ (((n >> 32) * reference.HASH_ROW) & m32))
        h = fmix(r ^ (((n & m32) * reference.HASH_COL) & m32))
        assert bool(mask[n]) == ((h >> 8) >= thr), n


# ------------------------------------------------------------------------------------------- the mask
@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
def test_seed_determines_the_mask(backend):
    x = _x((5, 301), torch.float32)
    a = dropout(x, 0.5, seed=11, backend=backend)
    assert torch.equal(a, dropout(x, 0.5, seed=11, backend=backend)), "the same seed must give the same mask"
    for other in (12, 11 + 2**32, 11 + 2**62):  # both 32-bit halves of the seed matter
        assert not torch.equal(a != 0, dropout(x, 0.5, seed=other, backend=backend) != 0), other
    # seeds are taken mod 2^64: -1 and 2^64 - 1 are the same 64 bits
    assert torch.equal(dropout(x, 0.5, seed=-1, backend=backend), dropout(x, 0.5, seed=2**64 - 1, backend=backend))


@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_binomial(backend, p):
    """Each element is kept with probability 1 - thr / 2^24 (|that - (1 - p)| <= 2^-25, negligible here). Over
    n elements the kept fraction has sigma = sqrt(p (1 - p) / n); a 5-sigma band fails by chance with
    probability < 1e-6 (and the seed is fixed), so a failure means a biased hash. The same band is applied to
    each of 8 contiguous blocks (n / 8 elements each), which catches a bias that depends on the index."""
    n, blocks = 1 << 18, 8
    y = dropout(torch.ones(n), p, seed=2024, backend=backend)  # (n,)
    kept = (y != 0).double()
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    per_block = kept.view(blocks, -1).mean(1)  # (blocks,)
    assert ((per_block - (1 - p)).abs() < 5 * math.sqrt(p * (1 - p) * blocks / n)).all(), per_block


@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
def test_seed_none_follows_torch_manual_seed(backend):
    x = _x((9, 40), torch.float32)
    torch.manual_seed(42)
    a = dropout(x, 0.3, backend=backend)
    torch.manual_seed(42)
    b = dropout(x, 0.3, backend=backend)
    torch.manual_seed(42)
    drawn = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # what the op draws
    assert torch.equal(a, b)
    assert torch.equal(a, dropout(x, 0.3, seed=drawn, backend=backend))
    torch.manual_seed(43)
    assert not torch.equal(a, dropout(x, 0.3, backend=backend))
    assert not torch.equal(dropout(x, 0.3, backend=backend), dropout(x, 0.3, backend=backend))  # a fresh draw


# ------------------------------------------------------------------------------------------- api
@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
def test_p_zero_returns_x_and_non_contiguous_input(backend):
    x = _x((6, 50), torch.float32)
    assert dropout(x, 0.0, backend=backend) is x
    xt = x.t()  # (50, 6), non-contiguous: the mask indexes its contiguous copy
    y = dropout(xt, 0.4, seed=3, backend=backend)
    assert y.is_contiguous() and torch.equal(y, dropout(xt.contiguous(), 0.4, seed=3, backend=backend))
    empty = torch.empty(0, 4)
    assert dropout(empty, 0.4, seed=3, backend=backend).shape == (0, 4)


@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
@pytest.mark.parametrize("p, exc, match", [
    (1.0, ValueError, r"p must be in \[0, 1\), got p=1.0"),
    (-0.1, ValueError, r"p must be in \[0, 1\), got p=-0.1"),
    (float("nan"), ValueError, r"got p=nan"),
    ("0.5", TypeError, "p must be a float"),
    (True, TypeError, "p must be a float"),
])
def test_bad_p(backend, p, exc, match):
    with pytest.raises(exc, match=match):
        dropout(torch.ones(3), p, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
@pytest.mark.parametrize("x, match", [
    (torch.ones(3, dtype=torch.int64), "x must be a floating tensor"),
    (torch.ones(3, dtype=torch.bool), "x must be a floating tensor"),
    ([1.0, 2.0], "x must be a torch.Tensor"),
])
def test_bad_input(backend, x, match):
    with pytest.raises(TypeError, match=match):
        dropout(x, 0.5, backend=backend)


@pytest.mark.skipif(not INTERP, reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_refuses_float64():
    with pytest.raises(TypeError, match="triton backend supports float32/bfloat16/float16, not float64"):
        dropout(torch.ones(3, dtype=torch.float64), 0.5, backend="triton")


def test_cpp_boundary_checks_name_the_argument():
    op, x, s = torch.ops.fastllm.dropout_fwd, torch.randn(4, 8), torch.tensor(1)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(x.t(), 0.5, s)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        op(x, 1.0, s)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        op(x, 0.5, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        op(torch.ones(3, dtype=torch.int32), 0.5, s)


def test_auto_selects_cpu_kernel():
    assert backends.select("dropout", "cpu") == "cpu"


# ------------------------------------------------------------------------------------------- autograd, framework
@pytest.mark.parametrize("backend", _cpu_backends())
def test_only_the_seed_is_saved_and_double_backward(backend):
    x = _x((64, 64), torch.float32).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout(x, 0.5, seed=9, backend=backend)
    assert [t.numel() for t in saved] == [1] and saved[0].dtype == torch.int64 and saved[0].device.type == "cpu"
    g = torch.randn_like(x, requires_grad=True)
    (dx,) = torch.autograd.grad(y, x, g, create_graph=True)
    (dg,) = torch.autograd.grad(dx, g, torch.ones_like(dx))  # the backward is linear in g with the same mask
    assert _bits_equal(dg, _scaled(torch.ones_like(x), 0.5) * (y.detach() != 0))


def test_opcheck_native():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = _x((5, 33), dtype).requires_grad_(True)
        torch.library.opcheck(torch.ops.fastllm.dropout_fwd.default, (x, 0.3, torch.tensor(7)))
    torch.library.opcheck(torch.ops.fastllm.dropout_fwd.default, (torch.randn(0, 3), 0.3, torch.tensor(7)))


@pytest.mark.skipif(not INTERP, reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_opcheck_triton():
    from fastllm.kernels import dropout as kernel

    op = kernel.dropout_fwd_op()
    x = _x((5, 33), torch.float32).requires_grad_(True)
    # test_aot_dispatch_* would trace the kernel with fake tensors, which the CPU interpreter cannot run.
    torch.library.opcheck(op, (x, 0.3, torch.tensor(7)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _compiled_dropout_checks(device="cpu", backend="auto"):
    """torch.compile(fullgraph=True) of a block with dropout: the seed is drawn inside the graph (no graph
    break); torch.manual_seed reproduces it; the result is a valid dropout; the compiled backward uses the
    forward's mask; an explicit seed gives the eager bits."""
    p = 0.3
    x, dout = _x((37, 64), torch.float32, device), _x((37, 64), torch.float32, device, seed=1)

    def block(t, seed=None):  # the scalings by 2 and 4 are exact: the checks below can undo them
        return dropout(t * 2, p, seed=seed, backend=backend) * 4

    compiled = torch.compile(block, fullgraph=True)
    runs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        runs.append(_run(compiled, x, dout))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    y, dx = runs[0]
    keep = check_definition(y / 4, x * 2, p)
    # kept fraction over 37 * 64 = 2368 elements: a 5-sigma binomial band (see test_kept_fraction_is_binomial)
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    assert _bits_equal(dx, 2 * torch.where(keep, _scaled(dout * 4, p), torch.zeros_like(dout)))
    torch.manual_seed(5)
    eager = _run(block, x, dout)
    assert check_definition(eager[0] / 4, x * 2, p) is not None  # eager is a valid dropout too (another mask)
    seeded = torch.compile(lambda t: block(t, seed=99), fullgraph=True)
    for a, b in zip(_run(seeded, x, dout), _run(lambda t: block(t, seed=99), x, dout)):
        assert _bits_equal(a, b)


def test_torch_compile_fullgraph():
    _compiled_dropout_checks()


# ------------------------------------------------------------------------------------------- GPU
def _cuda_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b for b in backends.available("dropout", "cuda") if b != "reference"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_bit_identical_to_reference(dtype):
    names = _cuda_backends()
    assert "cuda" in names and "triton" in names, f"missing GPU backends (available: {names})"
    for backend in names:
        if backend == "triton" and dtype == torch.float64:
            continue
        for shape in [*SHAPES, (1000, 1031)]:
            x, dout = _x(shape, dtype, "cuda"), _x(shape, dtype, "cuda", seed=1)
            got = _run(lambda t, b=backend: dropout(t, 0.3, seed=2**40 + 5, backend=b), x, dout)
            want = _run(lambda t: dropout(t, 0.3, seed=2**40 + 5, backend="reference"), x.cpu(), dout.cpu())
            for name, a, b in zip(("y", "dx"), got, want):
                assert _bits_equal(a.cpu(), b), f"{backend} {dtype} {shape} {name}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_torch_compile_and_opcheck(backend):
    _compiled_dropout_checks("cuda", backend)
    op = torch.ops.fastllm.dropout_fwd.default if backend == "cuda" else torch.ops.fastllm.dropout_fwd_triton.default
    x = _x((5, 33), torch.bfloat16, "cuda").requires_grad_(True)
    torch.library.opcheck(op, (x, 0.3, torch.tensor(7)))
