"""The compiled extension and the Triton backend are really there when they are expected to be.

A build that silently failed would otherwise turn every kernel test into a test of the reference backend.
Opt-outs are explicit: FASTLLM_EXPECT_EXT=0 (no C++ compiler on purpose), FASTLLM_EXPECT_TRITON=0.
"""
import importlib.util
import os

import pytest
import torch

import fastllm
from fastllm import _ext
from fastllm.ops import backends


@pytest.mark.skipif(os.environ.get("FASTLLM_EXPECT_EXT") == "0", reason="FASTLLM_EXPECT_EXT=0: no extension expected")
def test_extension_built_and_loaded():
    status = _ext.load()
    assert status.loaded, f"fastllm._C was expected but did not load: {status.error}"
    assert fastllm.extension_loaded()
    assert hasattr(torch.ops.fastllm, "layer_norm_fwd") and hasattr(torch.ops.fastllm, "layer_norm_bwd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastllm::layer_norm_fwd", "CPU")
    assert backends.select("layer_norm", "cpu") == "cpu"


@pytest.mark.skipif(os.environ.get("FASTLLM_EXPECT_TRITON") == "0", reason="FASTLLM_EXPECT_TRITON=0")
def test_triton_installed_and_usable_for_tests():
    assert importlib.util.find_spec("triton") is not None, "triton is part of the [test] extra but is missing"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert "triton" in backends.available("layer_norm", dev)


def test_extension_failure_is_reported_not_raised(monkeypatch):
    """Without the library, load() reports why instead of raising (import fastllm must keep working)."""
    import importlib

    def broken(name, *a, **k):
        raise ImportError("simulated: no compiler")

    monkeypatch.setattr(importlib, "import_module", broken)
    _ext.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="reference backend"):
            status = _ext.load()
        assert not status.loaded and "simulated" in status.error
    finally:
        monkeypatch.undo()
        _ext.load.cache_clear()
        assert _ext.load().loaded or os.environ.get("FASTLLM_EXPECT_EXT") == "0"
