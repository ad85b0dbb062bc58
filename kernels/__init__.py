"""Triton kernels of fastllm, installed as the subpackage `fastllm.kernels` (one module per op stem).

Invariant: importing this package never imports triton; each op module does, and is itself imported lazily by
fastllm.ops only when the triton backend is selected.
"""
