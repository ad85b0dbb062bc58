"""The public face of every fastllm op; see fastllm.ops.backends for how a backend is chosen."""
from fastllm.ops import backends, reference
from fastllm.ops.attention import attention, attention_varlen
from fastllm.ops.cross_entropy import cross_entropy, linear_cross_entropy
from fastllm.ops.dropout import dropout
from fastllm.ops.layer_norm import layer_norm

__all__ = ["attention", "attention_varlen", "backends", "cross_entropy", "dropout", "layer_norm",
           "linear_cross_entropy", "reference"]
