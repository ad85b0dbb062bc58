"""fastllm: training language models from scratch with fused C++/CUDA/Triton kernels.

Importing fastllm loads the compiled op library (fastllm._C) when it was built; without it every op uses its
reference backend and one warning says why (see fastllm._ext).
"""
from fastllm import _ext

_ext.load()  # registers torch.ops.fastllm.* (or warns once and leaves the reference backends)

__version__ = "0.1.0"
__all__ = ["__version__", "extension_loaded"]


def extension_loaded() -> bool:
    """True when the compiled ops of fastllm._C are registered with the dispatcher."""
    return _ext.load().loaded
