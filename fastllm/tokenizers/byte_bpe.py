"""GPT-2 style byte-level BPE: `ByteLevelBPETokenizer`.

Invariants:
- Text is split with GPT-2's regex (fastllm.tokenizers.pretokenize.GPT2_PATTERN), each piece's UTF-8 bytes are
  mapped to GPT-2's printable characters and merged by rank; every byte has a token, so there is no unknown
  token and `decode(encode(s).ids) == s` for every str s that is valid Unicode (no lone surrogates).
- Token strings are in GPT-2's mapped form ("Ġthe" is b" the"); special tokens are kept verbatim and are not
  byte-mapped: user text never produces them unless `allowed_special` names them.
- Reads and writes vocab.json + merges.txt (GPT-2's encoder.json + vocab.bpe format).
- Training is HuggingFace's ByteLevel BPE trainer: initial vocabulary = special tokens, then the 256 byte
  characters in code-point order; the learned merges equal HuggingFace's for the same corpus and settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastllm.tokenizers import _native
from fastllm.tokenizers.base import Template, Tokenizer
from fastllm.tokenizers.files import (
    merges_to_ids,
    read_merges_txt,
    read_vocab_json,
    write_merges_txt,
    write_vocab_json,
)
from fastllm.tokenizers.reference import ByteLevelBPEReference
from fastllm.tokenizers.trainer import TextSource, TrainConfig, count_words, initial_vocab, run_merges
from fastllm.tokenizers.unicode import bytes_to_token, bytes_to_unicode, token_to_bytes

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"


class ByteLevelBPETokenizer(Tokenizer):
    kind = "byte_bpe"
    default_special_tokens = ("<|endoftext|>",)
    default_template = Template()

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        *,
        special_tokens: Sequence[str] | None = None,
        template: Template | None = None,
        pad_token: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            special_tokens=special_tokens,
            template=template,
            unk_token=None,
            pad_token=pad_token,
            backend=backend,
        )
        self.merges: list[tuple[str, str]] = []
        self._source = "<arguments>"
        if vocab is not None:
            self._set_model(vocab, merges or [], "<arguments>")

    @classmethod
    def from_files(
        cls, vocab_file: str | Path, merges_file: str | Path, **kwargs: Any
    ) -> ByteLevelBPETokenizer:
        """GPT-2's encoder.json + vocab.bpe (or vocab.json + merges.txt)."""
        tok = cls(**kwargs)
        tok._set_model(
            read_vocab_json(vocab_file), read_merges_txt(merges_file), f"{vocab_file} + {merges_file}"
        )
        return tok

    def _set_model(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], source: str) -> None:
        self.merges = list(merges)
        self._source = source
        self._set_vocab(vocab, source)

    def _byte_vocab(self) -> dict[bytes, int]:
        specials = set(self.special_tokens)
        out: dict[bytes, int] = {}
        for token, idx in self._vocab.items():
            if token in specials:
                continue
            try:
                out[token_to_bytes(token)] = idx
            except KeyError as err:
                raise ValueError(
                    f"{self._source}: token {token!r} (id {idx}) has the character {err.args[0]!r}, "
                    f"which is not in GPT-2's byte alphabet; declare it a special token"
                ) from None
        for b in range(256):
            if bytes([b]) not in out:
                raise ValueError(
                    f"{self._source}: the vocabulary lacks {bytes_to_token(bytes([b]))!r}, the token "
                    f"of byte 0x{b:02x} (a byte-level vocabulary needs all 256)"
                )
        return out

    def _make_engine(self) -> Any:
        byte_vocab = self._byte_vocab()
        merges = merges_to_ids(self.merges, self._vocab, self._source)
        if self.backend == "core":
            return _native.CoreEngine(_native.load_core().ByteLevelBPE(list(byte_vocab.items()), merges))
        return ByteLevelBPEReference(byte_vocab, merges)

    def _decode_tokens(self, tokens: list[str]) -> str:
        specials = set(self.special_tokens)
        raw = bytearray()
        for token in tokens:
            raw += token.encode("utf-8") if token in specials else token_to_bytes(token)
        return raw.decode("utf-8", errors="replace")

    def _train(self, source: TextSource, config: TrainConfig, num_threads: int) -> None:
        counts = count_words(source, config, None, self.backend, num_threads)
        vocab = initial_vocab(config, sorted(bytes_to_unicode().values()))
        index = {token: i for i, token in enumerate(vocab)}
        byte_ids = [index[ch] for _, ch in sorted(bytes_to_unicode().items())]
        words = sorted(counts)
        symbols = [[byte_ids[b] for b in word] for word in words]
        result = run_merges(symbols, [counts[w] for w in words], vocab, config, "", self.backend)
        merges = [(result.vocab[a], result.vocab[b]) for a, b, _ in result.merges]
        self._set_model({token: i for i, token in enumerate(result.vocab)}, merges, "<trained>")

    def _save_native(self, directory: Path) -> None:
        write_vocab_json(directory / VOCAB_FILE, self._vocab)
        write_merges_txt(directory / MERGES_FILE, self.merges)

    @classmethod
    def _load_native(cls, directory: Path, backend: str) -> ByteLevelBPETokenizer:
        return cls.from_files(directory / VOCAB_FILE, directory / MERGES_FILE, backend=backend)
