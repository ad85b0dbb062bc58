"""fastllm.ops.attention / attention_varlen against a float64 reference, for every backend this machine has.

Rule (ARCHITECTURE.md): max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + atol for the output and
dq, dk, dv, where torch_same_dtype is the materialized reference run in the kernel's dtype. The reference uses
the same counter-hash dropout mask, so gradients with dropout are checked against it too.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from fastllm.ops import attention, attention_varlen, backends, reference
from tests.ops.tolerance import EPS, assert_close_ratio, default_atol

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _cpu_backends() -> list[str]:
    return [b for b in backends.available("attention", "cpu") if b != "reference"]


def _inputs(b, h, hkv, tq, tk, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 7919 * tq + tk)
    rnd = (lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype))
    return rnd(b, h, tq, d), rnd(b, hkv, tk, d), rnd(b, hkv, tk, d), rnd(b, h, tq, d)


def _padding_mask(b, tk, device="cpu"):
    g = torch.Generator().manual_seed(tk)
    mask = torch.rand(b, tk, generator=g) > 0.3  # (B, Tk), True = attend
    mask[0] = False  # batch 0: every key masked, every row must come out as zeros
    return mask.to(device)


def _run(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    (out * dout.to(out.dtype)).sum().backward()
    return [out] + [t.grad for t in leaves]


def _cancellation_atol(q, k, v, dout, dtype) -> float:
    """dS = P (dP - delta) subtracts two values of size |dO| |v| sqrt(D) that are equal when a row attends one
    key (then the exact dq, dk are 0, and so is torch's materialized error): one fp32 roundoff of each, times
    |k| or |q| and the scale, is what a correct fused kernel may leave per term."""
    d = q.shape[-1]
    mag = dout.abs().max() * v.abs().max() * d**0.5 * max(q.abs().max(), k.abs().max()) / d**0.5
    return 4 * EPS[torch.float32 if dtype == torch.float32 else dtype] * mag.item()


def check_attention(backend, b, h, hkv, tq, tk, d, dtype, causal, masked, p, device="cpu"):
    q, k, v, dout = _inputs(b, h, hkv, tq, tk, d, dtype, device)
    mask = _padding_mask(b, tk, device) if masked else None
    kw = dict(causal=causal, key_padding_mask=mask, dropout_p=p, generator_seed=1234)
    got = _run(lambda *a: attention(*a, backend=backend, **kw), q, k, v, dout)
    ref = _run(lambda *a: attention(*(t.double() for t in a), backend="reference", **kw), q, k, v, dout)
    same = _run(lambda *a: attention(*a, backend="reference", **kw), q, k, v, dout)
    # Terms summed behind each value: out and dq sum over keys, dk and dv over the query rows of the group.
    terms = {"out": tk, "dq": tk, "dk": tq * h // hkv, "dv": tq * h // hkv}
    cancel = _cancellation_atol(q, k, v, dout, dtype)
    smax = (q.double().abs().max() * k.double().abs().max() * q.shape[-1] ** 0.5).item()  # bound of |S|
    for name, x, x64, xt in zip(("out", "dq", "dk", "dv"), got, ref, same):
        assert x.dtype == dtype and x.shape == x64.shape and torch.isfinite(x).all(), name
        # atol: default_atol is a few roundoffs of the largest value times sqrt(terms); the kernels also use a
        # 20-ULP vectorized exp (at::vec exp_u20), inside that allowance for these sizes. dq and dk also get the
        # cancellation allowance (see _cancellation_atol).
        atol = default_atol(x64, dtype, terms[name]) + (cancel * terms[name] ** 0.5 if name in ("dq", "dk") else 0)
        if name != "out":  # the backward recomputes P = exp(S - lse): relative error ~ eps (|S| + |lse|), not eps
            atol += 2 * EPS[dtype] * (2 * smax + math.log(tk)) * x64.abs().max().item()
        assert_close_ratio(name, x, xt, x64, atol)
    if masked:
        assert got[0][0].abs().max() == 0 and got[1][0].abs().max() == 0  # all-masked batch: zeros, not NaN


SIZES = [1, 7, 65, 300]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq, tk", list(itertools.product(SIZES, SIZES)))
def test_cpu_matches_float64_reference(tq, tk, causal):
    if "cpu" not in _cpu_backends():
        pytest.fail("the cpu attention kernel is missing (tests/test_extension.py says why)")
    check_attention("cpu", 2, 3, 1 if tq % 2 else 3, tq, tk, 24, torch.float32, causal, masked=tk > 1, p=0.0)


@pytest.mark.parametrize("tq, tk, causal, p", [(700, 1100, True, 0.0), (1100, 700, False, 0.1), (600, 600, True, 0.2)])
def test_cpu_large_tiles_match_float64_reference(tq, tk, causal, p):
    """Sequences past 512 keys / 256 query rows take the forward's largest tiles (256 x 512), with tails."""
    check_attention("cpu", 2, 2, 1, tq, tk, 16, torch.float32, causal, masked=True, p=p)


# Head dims: vector tails (5, 33), one full 64-column panel of the AVX-512 tile GEMM (64), a panel plus a masked
# one (80), two panels (128), three with a half-masked last one (160). The tile GEMM's k loop in several passes
# (tile_gemm.h kDepth) is covered by the large tiles above (P V over 512 keys).
@pytest.mark.parametrize("d, hkv, p", [(5, 2, 0.0), (64, 1, 0.25), (33, 4, 0.1), (80, 1, 0.0), (128, 2, 0.1),
                                       (160, 4, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_head_dims_gqa_dropout_dtypes(dtype, d, hkv, p):
    check_attention("cpu", 3, 4, hkv, 65, 130, d, dtype, causal=True, masked=True, p=p)
    check_attention("cpu", 1, 4, hkv, 130, 65, d, dtype, causal=False, masked=False, p=p)


@pytest.mark.skipif(not INTERP, reason="Triton on CPU needs TRITON_INTERPRET=1 (the GPU tests cover CUDA)")
@pytest.mark.parametrize("case", [
    (2, 2, 1, 7, 65, 16, False, True, 0.0),
    (1, 2, 2, 65, 7, 8, True, False, 0.0),  # Tq > Tk, causal: the first rows see no key
    (2, 3, 1, 33, 40, 24, True, True, 0.2),  # GQA + mask + causal + dropout, odd head dim
    (1, 1, 1, 1, 65, 32, True, False, 0.1),  # decoding: one query row, offset Tk - 1
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_interpreter_matches_float64_reference(case, dtype):
    check_attention("triton", *case[:6], dtype, *case[6:])


# ------------------------------------------------------------------------------------------------ varlen
def _packed(lens, h, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = torch.randn(t, h, d, generator=g), torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    return q, k, v, cu


def _pad(x, lens, tmax):
    """(total, H, D) -> (B, H, Tmax, D), zeros past each sequence."""
    out = x.new_zeros(len(lens), x.shape[1], tmax, x.shape[2])
    for b, (s, n) in enumerate(zip(itertools.accumulate([0, *lens]), lens)):
        out[b, :, :n] = x[s:s + n].transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
@pytest.mark.parametrize("causal, p", [(False, 0.0), (True, 0.0), (True, 0.2)])
def test_varlen_equals_padded(backend, causal, p):
    lens = [5, 1, 37, 20, 600] if backend != "triton" else [5, 1, 19]  # 600: the forward's 256 x 512 tiles
    q, k, v, cu = _packed(lens, 4, 2, 16)
    tmax = max(lens)
    kw = dict(causal=causal, dropout_p=p, generator_seed=77, backend=backend)
    out = attention_varlen(q, k, v, cu, cu, tmax, tmax, **kw)  # (total, H, D)
    mask = torch.arange(tmax)[None, :] < torch.tensor(lens)[:, None]  # (B, Tmax)
    padded = attention(_pad(q, lens, tmax), _pad(k, lens, tmax), _pad(v, lens, tmax), key_padding_mask=mask, **kw)
    for b, (s, n) in enumerate(zip(itertools.accumulate([0, *lens]), lens)):
        torch.testing.assert_close(out[s:s + n].transpose(0, 1), padded[b, :, :n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_varlen_gradients_match_reference(backend):
    lens = [3, 30, 1, 17] if backend != "triton" else [3, 17]
    q, k, v, cu = _packed(lens, 4, 1, 8, seed=3)
    q2, k2, v2, cu_k = _packed([n + 4 for n in lens], 4, 1, 8, seed=4)  # cross-attention, Tk = Tq + 4
    dout = torch.randn_like(q)
    kw = dict(causal=True, dropout_p=0.1, generator_seed=5)
    args = (cu, cu_k, max(lens), max(lens) + 4)
    got = _run(lambda a, b_, c: attention_varlen(a, b_, c, *args, backend=backend, **kw), q, k2, v2, dout)
    ref = _run(lambda a, b_, c: attention_varlen(a.double(), b_.double(), c.double(), *args, backend="reference",
                                                 **kw), q, k2, v2, dout)
    same = _run(lambda a, b_, c: attention_varlen(a, b_, c, *args, backend="reference", **kw), q, k2, v2, dout)
    for name, x, x64, xt in zip(("out", "dq", "dk", "dv"), got, ref, same):
        assert_close_ratio(name, x, xt, x64, default_atol(x64, torch.float32, 4 * max(lens)))  # <= 4*Tq terms


# ------------------------------------------------------------------------------------------------ dropout
def _recover_mask(backend, seed, p, b=2, h=3, tq=9, tk=40):
    """With q = 0 every allowed P is 1/Tk; with v = I, out[.., i, j] = keep_ij / ((1 - p) Tk)."""
    q = torch.zeros(b, h, tq, tk)
    k = torch.randn(b, h, tk, tk)
    v = torch.eye(tk).expand(b, h, tk, tk).contiguous()
    out = attention(q, k, v, dropout_p=p, generator_seed=seed, backend=backend)  # (B, H, Tq, Tk)
    return out * (1 - p) * tk > 0.5


@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
def test_dropout_mask_is_the_shared_hash(backend):
    p = 0.3
    keep = _recover_mask(backend, 99, p)
    bh = torch.arange(6).view(2, 3, 1, 1)
    expected = reference.dropout_keep(99, bh, torch.arange(9)[:, None], torch.arange(40)[None, :], p)
    assert torch.equal(keep, expected)
    assert not torch.equal(keep, _recover_mask(backend, 100, p)), "a different seed must change the mask"
    assert torch.equal(keep, _recover_mask(backend, 99, p)), "the same seed must give the same mask"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    n = 400_000
    keep = reference.dropout_keep(12345, torch.arange(4).view(4, 1, 1), torch.arange(100)[:, None],
                                  torch.arange(n // 400)[None, :], p)
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma  # a 5-sigma band: fails only if biased


def test_seed_from_torch_generator_reproduces_and_is_saved_for_backward():
    q, k, v, dout = _inputs(1, 2, 2, 16, 16, 8, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        outs.append(_run(lambda *a: attention(*a, dropout_p=0.3, backend="cpu"), q, k, v, dout))
        torch.manual_seed(42)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())  # what the op draws
        ref = _run(lambda *a: attention(*a, dropout_p=0.3, generator_seed=seed, backend="reference"), q, k, v, dout)
    for x, y, r in zip(outs[0], outs[1], ref):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5)
    torch.manual_seed(43)
    assert not torch.equal(attention(q, k, v, dropout_p=0.3), outs[0][0])


def _projection_views(b, h, hkv, t, d, dtype, seed=0):
    """q, k, v as (B, H, T, D) views of one (B, T, (H + 2 Hkv) D) projection, as MultiHeadAttention makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, generator=g).to(dtype)  # (B, T, (H + 2 Hkv) D)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    return [x.unflatten(-1, (-1, d)).transpose(1, 2) for x in (q, k, v)]  # (B, n, T, D) each, strided


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv, causal, p", [(4, False, 0.0), (2, True, 0.2), (1, False, 0.1)])
def test_cpu_reads_projection_views_and_returns_their_layout(dtype, hkv, causal, p):
    """The CPU kernel takes strided q, k, v (no copies) and gives out / dq / dk / dv laid out (B, T, H, D): the
    same values as from contiguous copies (the same arithmetic on the same numbers: equal to fp32 roundoff of a
    BLAS call with another leading dimension, 1e-6 relative), and merging heads back is a view."""
    q, k, v = _projection_views(2, 4, hkv, 33, 16, dtype)
    dout = torch.randn(2, 33, 4, 16).to(dtype).transpose(1, 2)  # (B, H, T, D) over (B, T, H, D) memory
    kw = {"causal": causal, "dropout_p": p, "generator_seed": 5, "backend": "cpu"}
    got = _run(lambda *a: attention(*a, **kw), q, k, v, dout)
    want = _run(lambda *a: attention(*(x.contiguous() for x in a), **kw), q, k, v, dout.contiguous())
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the outputs are rounded from equal fp32 values
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=name)
        assert x.transpose(1, 2).is_contiguous(), name  # (B, T, H, D) memory
    assert want[0].is_contiguous()  # contiguous inputs keep contiguous outputs
    torch.library.opcheck(torch.ops.fastllm.attention_fwd.default,
                          (q.detach().requires_grad_(), k, v, None, None, None, 33, 33, causal, p, 0.25, 3))


# ------------------------------------------------------------------------------------------------ framework
def test_opcheck_native():
    q, k, v, _ = _inputs(2, 4, 2, 9, 13, 8, torch.float32)
    mask = _padding_mask(2, 13)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastllm.attention_fwd.default,
                          (q, k, v, mask, None, None, 9, 13, True, 0.1, 0.3, 7))
    qv, kv, vv, cu = _packed([4, 9], 2, 1, 8)
    torch.library.opcheck(torch.ops.fastllm.attention_fwd.default,
                          (qv.requires_grad_(), kv, vv, None, cu, cu, 9, 9, False, 0.0, 0.5, 0))


@pytest.mark.skipif(not INTERP, reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_opcheck_triton():
    from fastllm.kernels import attention as kernel

    kernel.attention_fwd_op()
    q, k, v, _ = _inputs(1, 2, 1, 5, 6, 8, torch.float32)
    torch.library.opcheck(torch.ops.fastllm.attention_fwd_triton.default,
                          (q.requires_grad_(), k, v, None, None, None, 5, 6, True, 0.0, 0.3, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    q, k, v, dout = _inputs(2, 4, 2, 17, 17, 16, torch.float32)
    mask = _padding_mask(2, 17)
    mask[0, :3] = True

    def f(q, k, v):
        return attention(q, k, v, causal=True, key_padding_mask=mask).relu() * 2

    got = _run(torch.compile(f, fullgraph=True), q, k, v, dout)
    want = _run(f, q, k, v, dout)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_tensor_seed_wrapper_equals_int_seed_op(backend):
    """fastllm::attention_fwd_seeded (the compiled path's op: the seed is a 0-d tensor) is the int-seed op."""
    q, k, v, dout = _inputs(2, 4, 2, 9, 13, 8, torch.float32)
    mask = _padding_mask(2, 13)
    seed, p = 2**40 + 12345, 0.3  # both 32-bit halves of the seed matter
    want = _run(lambda *a: attention(*a, causal=True, key_padding_mask=mask, dropout_p=p, generator_seed=seed,
                                     backend=backend), q, k, v, dout)
    seeded = torch.ops.fastllm.attention_fwd_seeded
    args = (mask, None, None, 9, 13, True, p, 8**-0.5, torch.tensor(seed), backend)
    got = _run(lambda *a: seeded(*a, *args)[0], q, k, v, dout)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    bh, rows, cols = torch.arange(8).view(8, 1, 1), torch.arange(9)[:, None], torch.arange(13)[None, :]
    assert torch.equal(reference.dropout_keep(torch.tensor(seed), bh, rows, cols, p),
                       reference.dropout_keep(seed, bh, rows, cols, p))
    torch.library.opcheck(seeded.default, (q.requires_grad_(), k, v, mask, None, None, 9, 13, True, p, 0.3,
                                           torch.tensor(7), backend))


def test_torch_compile_fullgraph_with_dropout():
    """A drawn dropout seed stays in the graph (no .item() graph break): torch.manual_seed reproduces it, each
    call draws a new one, and the backward regenerates the forward's mask."""
    q, k, v, dout = _inputs(2, 4, 2, 17, 17, 16, torch.float32)
    mask = _padding_mask(2, 17)
    mask[0, :3] = True

    def f(q, k, v):
        return attention(q, k, v, causal=True, key_padding_mask=mask, dropout_p=0.3)

    compiled = torch.compile(f, fullgraph=True)
    runs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        runs.append(_run(compiled, q, k, v, dout))
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1]))  # reproducible under torch.manual_seed
    assert not torch.equal(runs[0][0], runs[2][0])  # another seed, another mask
    assert not torch.allclose(runs[0][0], attention(q, k, v, causal=True, key_padding_mask=mask))  # dropped
    # out = P_drop v is linear in v, so <out, dout> = <v, dv> exactly when the backward uses the forward's
    # mask (another seed's mask gives -53.8 against -41.1 here); fp32 sums of 2 * 4 * 17 * 16 terms of size
    # ~1: 1e-4 relative.
    out, _, _, dv = runs[0]
    torch.testing.assert_close((dv * v).sum(), (out.detach() * dout).sum(), rtol=1e-4, atol=1e-4)


def test_saved_tensors_are_linear_in_t():
    """Only the inputs, out and the (B, H, T) lse are kept for the backward: nothing of size Tq * Tk."""
    q, k, v, _ = _inputs(1, 2, 2, 256, 256, 8, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        attention(q.requires_grad_(), k, v, causal=True, backend="cpu")
    assert max(saved) <= q.numel() and sum(saved) <= 4 * q.numel() + 2 * 256, saved


@pytest.mark.parametrize("backend", ["reference"] + _cpu_backends())
@pytest.mark.parametrize("case, exc, match", [
    ("head_dim", ValueError, r"head dim of q \(8\) != head dim of k \(6\)"),
    ("heads", ValueError, r"query heads \(3\) must be a multiple of kv heads \(2\)"),
    ("mask_shape", ValueError, r"key_padding_mask has shape \(2, 4\) but expected"),
    ("mask_dtype", TypeError, "key_padding_mask must be a bool tensor"),
    ("dropout", ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dims", ValueError, "q must have 4 dims"),
])
def test_bad_inputs(backend, case, exc, match):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    kw = {}
    if case == "head_dim":
        k, v = torch.randn(2, 2, 7, 6), torch.randn(2, 2, 7, 6)
    elif case == "heads":
        q = torch.randn(2, 3, 5, 8)
    elif case == "mask_shape":
        kw["key_padding_mask"] = torch.ones(2, 4, dtype=torch.bool)
    elif case == "mask_dtype":
        kw["key_padding_mask"] = torch.ones(2, 7)
    elif case == "dropout":
        kw["dropout_p"] = 1.0
    elif case == "dims":
        q = torch.randn(4, 5, 8)
    with pytest.raises(exc, match=match):
        attention(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize("cu, match", [([0, 5, 3, 9], "non-decreasing"), ([1, 5, 9], "start at 0"),
                                       ([0, 2, 9], "longer than its max_seqlen")])
def test_bad_cu_seqlens(cu, match):
    q = torch.randn(9, 2, 8)
    with pytest.raises(ValueError, match=match):
        attention_varlen(q, q, q, torch.tensor(cu), torch.tensor(cu), 6, 6)


def test_cpp_boundary_checks_name_the_argument():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="k must have a contiguous last"):
        torch.ops.fastllm.attention_fwd(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, None, None, None,
                                        3, 4, False, 0.0, 1.0, 0)
    cu = torch.tensor([0, 3, 2, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
        x = torch.randn(4, 2, 8)  # (total, H, D)
        torch.ops.fastllm.attention_fwd(x, x, x, None, cu, cu, 4, 4, False, 0.0, 1.0, 0)


def test_auto_selects_cpu_kernel():
    assert backends.select("attention", "cpu") == "cpu"
    assert backends.select("attention_varlen", "cpu") == "cpu"


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_float64_reference(dtype, d):
    names = [b for b in backends.available("attention", "cuda") if b != "reference"]
    assert "cuda" in names and "triton" in names, f"missing GPU backends (available: {names})"
    for backend in names:
        for tq, tk in [(1, 65), (7, 7), (65, 300), (300, 65), (257, 257)]:
            for causal, masked, p in [(False, False, 0.0), (True, True, 0.0), (True, True, 0.2)]:
                check_attention(backend, 2, 4, 2, tq, tk, d, dtype, causal, masked, p, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_varlen_and_dropout_mask(backend):
    lens = [5, 1, 130, 64]
    q, k, v, cu = (t.cuda() for t in _packed(lens, 4, 2, 64))
    q, k, v = q.half(), k.half(), v.half()
    kw = dict(causal=True, dropout_p=0.2, generator_seed=3)
    got = attention_varlen(q, k, v, cu, cu, 130, 130, backend=backend, **kw)
    ref = attention_varlen(q.double(), k.double(), v.double(), cu, cu, 130, 130, backend="reference", **kw)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)  # fp16 output rounding + fp16 P in P.V
