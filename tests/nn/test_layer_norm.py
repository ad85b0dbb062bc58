"""fastllm.nn.LayerNorm is a drop-in for torch.nn.LayerNorm."""
import pytest
import torch

from fastllm.nn import LayerNorm


@pytest.mark.parametrize("shape", [64, (64,), (4, 16)])
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_same_state_dict_and_outputs_as_torch(shape, affine, bias):
    ref = torch.nn.LayerNorm(shape, eps=1e-6, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            if bias:
                ref.bias.normal_()
    ours = LayerNorm(shape, eps=1e-6, elementwise_affine=affine, bias=bias)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    dims = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(3, 5, *dims, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_ref.sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)


def test_residual_form_and_backend_choice():
    ln = LayerNorm(32)
    assert ln.backend == "cpu"
    x, r = torch.randn(2, 32), torch.randn(2, 32)
    y, h = ln(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (32,), ln.weight, ln.bias))
    assert LayerNorm(32, backend="reference").backend == "reference"


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps must be > 0"):
        LayerNorm(8, eps=0)
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm(0)
    with pytest.raises(ValueError, match=r"does not end in \(8,\)"):
        LayerNorm(8)(torch.randn(2, 7))
