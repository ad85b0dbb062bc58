"""Pure-Python encoders: the readable reference for the C++ core (fastllm.tokenizers._core) and its fallback.

Invariants:
- Each engine has `encode_texts(texts, with_offsets, num_threads) -> list[(ids, offsets | None)]`,
  `encode_ids(texts, num_threads) -> list[ids]` and `encode_full(texts, template, itos, num_threads)` (the six
  Encoding fields of each text inside a template) with the same
  results as the matching C++ class (tests compare them); offsets are (start, end) character indices into the
  text given, for every id.
- BPE applies merges the way HuggingFace and GPT-2 do: repeatedly merge the adjacent pair of lowest rank, the
  leftmost one on ties, until no adjacent pair has a rank. When a merge list names a pair twice, the last rank
  wins (as `dict(zip(merges, range(n)))` in GPT-2's encoder.py and HuggingFace's loader).
- WordPiece is greedy longest-match-first on characters; a word longer than `max_chars` characters, or one
  that cannot be covered, becomes one unknown token spanning the word.
- Caches are bounded (`CACHE_LIMIT` words) and only ever hold results that recomputing would reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastllm.tokenizers.normalization import NormalizerConfig, normalize
from fastllm.tokenizers.pretokenize import bert_spans, gpt2_spans

CACHE_LIMIT = 100_000
Offsets = list[tuple[int, int]]
Piece = tuple[int, int, int]  # (id, start, end) in characters of the word
Ranks = dict[tuple[int, int], tuple[int, int]]  # (left id, right id) -> (rank, merged id)


def merge_ranks(merges: Sequence[tuple[int, int, int]]) -> Ranks:
    return {(a, b): (rank, new) for rank, (a, b, new) in enumerate(merges)}


def bpe_merge(symbols: list[tuple[int, int]], ranks: Ranks) -> list[tuple[int, int]]:
    """Merge (id, length) symbols by rank; lengths add up so that offsets survive the merges."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best = None
        for pos in range(len(symbols) - 1):
            found = ranks.get((symbols[pos][0], symbols[pos + 1][0]))
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], found[1], pos)
        if best is None:
            break
        _, new, pos = best
        symbols[pos : pos + 2] = [(new, symbols[pos][1] + symbols[pos + 1][1])]
    return symbols


def pieces_from_lengths(symbols: list[tuple[int, int]]) -> list[Piece]:
    out: list[Piece] = []
    start = 0
    for sym, length in symbols:
        out.append((sym, start, start + length))
        start += length
    return out


def frame(ids: list[int], offsets: Offsets, template: Sequence[tuple[int, int]], itos: list[str]) -> tuple:
    """The six Encoding fields of one sequence in a template of (special id or -1 for the text, type id)."""
    out: tuple[list, list, list, list, list, list] = ([], [], [], [], [], [])
    for sym, type_id in template:
        seq = [(i, o, 0) for i, o in zip(ids, offsets)] if sym < 0 else [(sym, (0, 0), 1)]
        for i, o, special in seq:
            for field, value in zip(out, (i, itos[i], o, type_id, 1, special)):
                field.append(value)
    return out


class _Engine:
    """encode_ids and encode_full in terms of the engine's encode_text."""

    def encode_texts(self, texts: Sequence[str], with_offsets: bool, num_threads: int = 1):
        return [self.encode_text(t, with_offsets) for t in texts]

    def encode_ids(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode_text(t, False)[0] for t in texts]

    def encode_full(
        self, texts: Sequence[str], template: Sequence[tuple[int, int]], itos: list[str], num_threads: int = 1
    ) -> list[tuple]:
        return [frame(*self.encode_text(t, True), template, itos) for t in texts]


class _Cache:
    def __init__(self) -> None:
        self._items: dict[str | bytes, list[Piece]] = {}

    def get_or_compute(self, key, compute) -> list[Piece]:
        found = self._items.get(key)
        if found is None:
            found = compute(key)
            if len(self._items) >= CACHE_LIMIT:
                self._items.clear()
            self._items[key] = found
        return found


class ByteLevelBPEReference(_Engine):
    """GPT-2: regex pre-tokenization, each word's UTF-8 bytes merged by rank."""

    def __init__(self, byte_vocab: dict[bytes, int], merges: Sequence[tuple[int, int, int]]) -> None:
        self.byte_ids = [byte_vocab[bytes([b])] for b in range(256)]
        self.ranks = merge_ranks(merges)
        self.cache = _Cache()

    def _encode_word(self, word: bytes) -> list[Piece]:
        return pieces_from_lengths(bpe_merge([(self.byte_ids[b], 1) for b in word], self.ranks))

    def encode_text(self, text: str, with_offsets: bool) -> tuple[list[int], Offsets | None]:
        ids: list[int] = []
        offsets: Offsets = []
        for start, end in gpt2_spans(text):
            word = text[start:end]
            pieces = self.cache.get_or_compute(word.encode("utf-8"), self._encode_word)
            ids.extend(p[0] for p in pieces)
            if with_offsets:
                offsets.extend(_byte_pieces_to_chars(word, start, pieces))
        return ids, (offsets if with_offsets else None)


def _byte_pieces_to_chars(word: str, start: int, pieces: list[Piece]) -> Offsets:
    """Byte ranges of a word -> character ranges; a token that splits a character covers all of it."""
    char_of_byte = [i for i, ch in enumerate(word) for _ in ch.encode("utf-8")]
    return [(start + char_of_byte[s], start + char_of_byte[e - 1] + 1) for _, s, e in pieces]


@dataclass(frozen=True)
class WordPieceModel:
    vocab: dict[str, int]
    unk_id: int
    prefix: str = "##"
    max_chars: int = 100

    def __call__(self, word: str) -> list[Piece]:
        if len(word) > self.max_chars:
            return [(self.unk_id, 0, len(word))]
        out: list[Piece] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return [(self.unk_id, 0, len(word))]
            out.append((self.vocab[piece], start, end))
            start = end
        return out


@dataclass(frozen=True)
class CharBPEModel:
    """Classic BPE: characters, the last one carrying `suffix`; each unknown character becomes `unk_id`."""

    vocab: dict[str, int]
    ranks: Ranks
    unk_id: int
    suffix: str = "</w>"

    def __call__(self, word: str) -> list[Piece]:
        symbols: list[tuple[int, int]] = []
        for i, ch in enumerate(word):
            sym = self.vocab.get(ch + self.suffix if i == len(word) - 1 else ch, self.unk_id)
            symbols.append((sym, 1))
        return pieces_from_lengths(bpe_merge(symbols, self.ranks))


class BasicReference(_Engine):
    """BERT-style: normalize, split on whitespace and punctuation, then a word model (WordPiece, char BPE)."""

    def __init__(self, normalizer: NormalizerConfig, model: WordPieceModel | CharBPEModel) -> None:
        self.normalizer = normalizer
        self.model = model
        self.cache = _Cache()

    def encode_text(self, text: str, with_offsets: bool) -> tuple[list[int], Offsets | None]:
        norm, align = normalize(text, self.normalizer)
        ids: list[int] = []
        offsets: Offsets = []
        for ws, we in bert_spans(norm):
            for sym, s, e in self.cache.get_or_compute(norm[ws:we], self.model):
                ids.append(sym)
                if with_offsets:
                    span = align[ws + s : ws + e]
                    offsets.append((min(span), max(span) + 1))
        return ids, (offsets if with_offsets else None)
