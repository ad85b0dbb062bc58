"""BERT's WordPiece: `WordPieceTokenizer`.

Invariants:
- The basic tokenizer is HuggingFace's BertNormalizer + BertPreTokenizer: clean-up (control characters
  removed, whitespace to spaces), every CJK character its own word, optional accent stripping (NFD, drop Mn;
  on by default when lower-casing) and lower-casing, then a split on whitespace with each punctuation mark
  alone.
- Each word is split greedily, longest match first, continuation pieces carrying `prefix` ("##"); a word
  longer than `max_input_chars_per_word` characters, or one that cannot be covered, is a single unknown token.
- Offsets point into the original text (through normalization), as HuggingFace's.
- Training is frequency-based, as HuggingFace's WordPiece trainer: BPE merges over words whose non-initial
  characters carry the prefix, the merged token dropping the right part's prefix; the vocabulary is the result
  (special tokens, the characters, the "##" forms, then merged tokens). Unlike HuggingFace's, whose id order
  depends on hash order, it is deterministic (ties go to the smallest pair of ids).
- Reads and writes vocab.txt (one token per line, the line number is the id).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastllm.tokenizers import _native
from fastllm.tokenizers.base import Template, Tokenizer
from fastllm.tokenizers.files import read_vocab_txt, write_vocab_txt
from fastllm.tokenizers.normalization import NormalizerConfig
from fastllm.tokenizers.reference import BasicReference, WordPieceModel
from fastllm.tokenizers.trainer import (
    TextSource,
    TrainConfig,
    build_alphabet,
    count_words,
    initial_vocab,
    run_merges,
)

VOCAB_FILE = "vocab.txt"
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" do not", " don't"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class WordPieceTokenizer(Tokenizer):
    kind = "wordpiece"
    default_special_tokens = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    default_template = Template(("[CLS]", "$A", "[SEP]"), ("[CLS]", "$A", "[SEP]", "$B:1", "[SEP]:1"))
    default_unk = "[UNK]"
    default_pad = "[PAD]"
    requires_unk = True

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        *,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        clean_text: bool = True,
        handle_chinese_chars: bool = True,
        max_input_chars_per_word: int = 100,
        prefix: str = "##",
        cleanup: bool = True,
        special_tokens: Sequence[str] | None = None,
        template: Template | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            special_tokens=special_tokens,
            template=template,
            unk_token=unk_token,
            pad_token=pad_token,
            backend=backend,
        )
        if not prefix:
            raise ValueError("prefix (the continuation marker) must not be empty")
        self.normalizer = NormalizerConfig(clean_text, handle_chinese_chars, strip_accents, lowercase)
        self.max_input_chars_per_word = max_input_chars_per_word
        self.prefix = prefix
        self.cleanup = cleanup
        if vocab is not None:
            self._set_vocab(vocab, "<arguments>")

    @classmethod
    def from_vocab_txt(cls, path: str | Path, **kwargs: Any) -> WordPieceTokenizer:
        tok = cls(**kwargs)
        tok._set_vocab(read_vocab_txt(path), str(path))
        return tok

    def _make_engine(self) -> Any:
        unk = self._vocab[self.unk_token]
        n = self.normalizer
        if self.backend == "core":
            impl = _native.load_core().WordPiece(
                list(self._vocab.items()),
                unk,
                self.prefix,
                self.max_input_chars_per_word,
                n.clean_text,
                n.handle_chinese_chars,
                n.do_strip_accents,
                n.lowercase,
            )
            return _native.CoreEngine(impl)
        return BasicReference(n, WordPieceModel(self._vocab, unk, self.prefix, self.max_input_chars_per_word))

    def _decode_tokens(self, tokens: list[str]) -> str:
        """HuggingFace's WordPiece decoder: "##" pieces glue to the previous token, others get a space."""
        out = []
        for i, token in enumerate(tokens):
            if i:
                token = token[len(self.prefix) :] if token.startswith(self.prefix) else " " + token
            if self.cleanup:
                for dirty, clean in _CLEANUPS:
                    token = token.replace(dirty, clean)
            out.append(token)
        return "".join(out)

    def _train(self, source: TextSource, config: TrainConfig, num_threads: int) -> None:
        counts = count_words(source, config, self.normalizer, self.backend, num_threads)
        alphabet = build_alphabet(counts, config)
        kept = set(alphabet)
        continued = sorted({ch for w in counts for ch in w[1:] if ch in kept})
        vocab = initial_vocab(config, alphabet, [self.prefix + ch for ch in continued])
        index = {token: i for i, token in enumerate(vocab)}
        words = sorted(counts)
        symbols = [self._initial_symbols(w, kept, index) for w in words]
        result = run_merges(symbols, [counts[w] for w in words], vocab, config, self.prefix, self.backend)
        self._set_vocab({token: i for i, token in enumerate(result.vocab)}, "<trained>")

    def _initial_symbols(self, word: str, kept: set[str], index: dict[str, int]) -> list[int]:
        """As HuggingFace: characters outside the alphabet are skipped; all but the first carry the prefix."""
        return [index[ch if i == 0 else self.prefix + ch] for i, ch in enumerate(word) if ch in kept]

    def _save_native(self, directory: Path) -> None:
        write_vocab_txt(directory / VOCAB_FILE, self._vocab)

    @classmethod
    def _load_native(cls, directory: Path, backend: str) -> WordPieceTokenizer:
        return cls.from_vocab_txt(directory / VOCAB_FILE, backend=backend)
