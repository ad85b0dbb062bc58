"""The public face of every fastllm op; see fastllm.ops.backends for how a backend is chosen."""
from fastllm.ops import backends, reference
from fastllm.ops.layer_norm import layer_norm

__all__ = ["backends", "layer_norm", "reference"]
