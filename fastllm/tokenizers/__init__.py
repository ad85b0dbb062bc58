"""Tokenizers: classic BPE, GPT-2 byte-level BPE and BERT WordPiece behind one interface (`Tokenizer`).

Invariants:
- The fast path is the C++ core fastllm.tokenizers._core (pre-tokenization, normalization, word cache, merges
  and training in C++); when it is not built, every tokenizer falls back to the pure-Python reference
  (fastllm.tokenizers.reference, same results) with one logged warning. `backend="core"|"python"` forces one.
- No optional dependency is needed at run time: tokenizer.json is plain JSON; tqdm shows training progress.
- `load_tokenizer(dir)` picks the class from what the folder holds: tokenizer.json (its model and
  pre-tokenizer), else vocab.txt (WordPiece), else vocab.json + merges.txt (byte-level BPE, or classic BPE
  when the merges use the "</w>" end-of-word marker).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastllm.tokenizers.base import Encoding, Template, Tokenizer
from fastllm.tokenizers.bpe import BPETokenizer
from fastllm.tokenizers.byte_bpe import ByteLevelBPETokenizer
from fastllm.tokenizers.files import read_merges_txt
from fastllm.tokenizers.hf_json import read_tokenizer_json, to_tokenizer_json, write_tokenizer_json
from fastllm.tokenizers.wordpiece import WordPieceTokenizer

__all__ = [
    "BPETokenizer",
    "ByteLevelBPETokenizer",
    "Encoding",
    "Template",
    "Tokenizer",
    "WordPieceTokenizer",
    "load_tokenizer",
    "read_tokenizer_json",
    "to_tokenizer_json",
    "write_tokenizer_json",
]


def load_tokenizer(directory: str | os.PathLike, backend: str = "auto") -> Tokenizer:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    if (path / "tokenizer.json").is_file():
        return read_tokenizer_json(path / "tokenizer.json", backend)
    if (path / "vocab.txt").is_file():
        return WordPieceTokenizer.load(path, backend)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        merges = read_merges_txt(path / "merges.txt")
        classic = any(b.endswith("</w>") for _, b in merges)
        return (BPETokenizer if classic else ByteLevelBPETokenizer).load(path, backend)
    raise FileNotFoundError(f"{path} holds no tokenizer.json, vocab.txt, or vocab.json + merges.txt")
