"""Classic BPE (Sennrich et al., 2016): `BPETokenizer`.

Invariants:
- Pre-tokenization is BERT's basic split (whitespace, each punctuation mark alone) after BERT's clean-up and
  CJK padding; lower-casing is optional (no accent stripping); `normalizer` replaces these defaults.
- Each word is split into characters, the last one carrying the end-of-word marker `suffix` ("</w>"), then
  merged by rank. A character outside the vocabulary is the unknown token (one per character), so an unknown
  token is required.
- Training: initial vocabulary = special tokens, the characters in code-point order, then the word-final forms
  "c</w>" in code-point order; merges by frequency, ties to the smallest pair of ids (deterministic).
- Decoding joins tokens and turns the end-of-word marker into a space (lossy: whitespace is not kept).
- Reads and writes vocab.json + merges.txt; tokenizer.json uses BertNormalizer + BertPreTokenizer + BPE with
  end_of_word_suffix + BPEDecoder, which HuggingFace `tokenizers` encodes identically.
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
from fastllm.tokenizers.normalization import NormalizerConfig
from fastllm.tokenizers.reference import BasicReference, CharBPEModel, merge_ranks
from fastllm.tokenizers.trainer import (
    TextSource,
    TrainConfig,
    build_alphabet,
    count_words,
    initial_vocab,
    run_merges,
)

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"


class BPETokenizer(Tokenizer):
    kind = "bpe"
    default_special_tokens = ("<pad>", "<unk>", "<s>", "</s>", "<mask>")
    default_template = Template(("<s>", "$A", "</s>"), ("<s>", "$A", "</s>", "$B:1", "</s>:1"))
    default_unk = "<unk>"
    default_pad = "<pad>"
    requires_unk = True

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        *,
        lowercase: bool = False,
        normalizer: NormalizerConfig | None = None,
        suffix: str = "</w>",
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
        if not suffix:
            raise ValueError("suffix (the end-of-word marker) must not be empty")
        self.normalizer = normalizer or NormalizerConfig(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase
        )
        self.suffix = suffix
        self.merges: list[tuple[str, str]] = []
        self._source = "<arguments>"
        if vocab is not None:
            self._set_model(vocab, merges or [], "<arguments>")

    @classmethod
    def from_files(cls, vocab_file: str | Path, merges_file: str | Path, **kwargs: Any) -> BPETokenizer:
        tok = cls(**kwargs)
        tok._set_model(
            read_vocab_json(vocab_file), read_merges_txt(merges_file), f"{vocab_file} + {merges_file}"
        )
        return tok

    def _set_model(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], source: str) -> None:
        self.merges = list(merges)
        self._source = source
        self._set_vocab(vocab, source)

    def _make_engine(self) -> Any:
        merges = merges_to_ids(self.merges, self._vocab, self._source)
        unk = self._vocab[self.unk_token]
        n = self.normalizer
        if self.backend == "core":
            impl = _native.load_core().CharBPE(
                list(self._vocab.items()),
                merges,
                unk,
                self.suffix,
                n.clean_text,
                n.handle_chinese_chars,
                n.do_strip_accents,
                n.lowercase,
            )
            return _native.CoreEngine(impl)
        return BasicReference(n, CharBPEModel(self._vocab, merge_ranks(merges), unk, self.suffix))

    def _decode_tokens(self, tokens: list[str]) -> str:
        last = len(tokens) - 1
        return "".join(t.replace(self.suffix, "" if i == last else " ") for i, t in enumerate(tokens))

    def _train(self, source: TextSource, config: TrainConfig, num_threads: int) -> None:
        counts = count_words(source, config, self.normalizer, self.backend, num_threads)
        alphabet = build_alphabet(counts, config)
        kept = set(alphabet)
        finals = sorted({w[-1] for w in counts if w[-1] in kept})
        vocab = initial_vocab(config, alphabet, [c + self.suffix for c in finals])
        index = {token: i for i, token in enumerate(vocab)}
        words = sorted(counts)
        symbols = [self._initial_symbols(w, kept, index) for w in words]
        result = run_merges(symbols, [counts[w] for w in words], vocab, config, "", self.backend)
        merges = [(result.vocab[a], result.vocab[b]) for a, b, _ in result.merges]
        self._set_model({token: i for i, token in enumerate(result.vocab)}, merges, "<trained>")

    def _initial_symbols(self, word: str, kept: set[str], index: dict[str, int]) -> list[int]:
        """As HuggingFace: characters outside the alphabet are skipped; the suffix marks the last one."""
        last = len(word) - 1
        return [index[ch + self.suffix if i == last else ch] for i, ch in enumerate(word) if ch in kept]

    def _save_native(self, directory: Path) -> None:
        write_vocab_json(directory / VOCAB_FILE, self._vocab)
        write_merges_txt(directory / MERGES_FILE, self.merges)

    @classmethod
    def _load_native(cls, directory: Path, backend: str) -> BPETokenizer:
        return cls.from_files(directory / VOCAB_FILE, directory / MERGES_FILE, backend=backend)
