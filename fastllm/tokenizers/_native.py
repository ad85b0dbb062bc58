"""Chooses between the C++ core (fastllm.tokenizers._core) and the pure-Python reference.

Invariants:
- `load_core()` never raises: it returns the module, or None and remembers why (`core_error()`); one warning
  is logged the first time the core is missing and "auto" falls back to Python.
- `resolve(backend)` maps "auto" to "core" when the core imports, else to "python"; an explicit "core" that
  is not available raises ImportError with the reason, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

BACKENDS = ("auto", "core", "python")
log = logging.getLogger("fastllm.tokenizers")


@functools.cache
def _import_core() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("fastllm.tokenizers._core"), ""
    except ImportError as err:
        return None, str(err)


def load_core() -> ModuleType | None:
    return _import_core()[0]


def core_error() -> str:
    return _import_core()[1]


@functools.cache
def _warn_fallback() -> None:
    log.warning(
        "fastllm.tokenizers._core is not available (%s); tokenizers use the slow pure-Python backend",
        core_error(),
    )


def resolve(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "python":
        return "python"
    if load_core() is not None:
        return "core"
    if backend == "core":
        raise ImportError(
            f"backend='core' was asked for but fastllm.tokenizers._core failed to import: {core_error()}"
        )
    _warn_fallback()
    return "python"


class CoreEngine:
    """Adapts a _core encoder to the engine interface of fastllm.tokenizers.reference."""

    def __init__(self, impl) -> None:
        self.impl = impl

    def encode_texts(self, texts: list[str], with_offsets: bool, num_threads: int = 1):
        out = self.impl.encode_batch(texts, with_offsets, num_threads)
        return out if with_offsets else [(ids, None) for ids in out]

    def encode_ids(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.impl.encode_batch(texts, False, num_threads)

    def encode_full(
        self, texts: list[str], template: list[tuple[int, int]], itos: list[str], num_threads: int = 1
    ):
        return self.impl.encode_batch_full(texts, template, itos, num_threads)
