"""Training: streamed word counts, then incremental BPE merges (for classic BPE, byte-level BPE, WordPiece).

Invariants:
- Input is streamed: `iter_texts` yields one text at a time; files (given as pathlib.Path / os.PathLike, never
  as str, which is always text) are read line by line in binary, each line with its line ending, decoded as
  UTF-8 (an error names the file and line). Only the word counts are held in memory.
- Initial vocabulary: special tokens first (in the order given), then the alphabet in code-point order, then
  (classic BPE / WordPiece) the word-final / continuation forms of the alphabet in code-point order. Training
  never depends on hash order or PYTHONHASHSEED.
- The merge loop is HuggingFace's: take the pair with the highest count, ties to the smallest (left id,
  right id); stop at `vocab_size` tokens or when the best count is below `min_frequency`. A merge whose string
  already is a token reuses its id. Pair counts are kept exact incrementally: a merge only revisits the words
  that contain the merged pair (an index from pair to words), and pushes the pairs whose counts grew onto a
  lazy max-heap.
- `train_merges` (Python, the reference) and `_core.train_bpe` (C++) return identical results.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastllm.tokenizers._native import load_core
from fastllm.tokenizers.normalization import NormalizerConfig, normalize
from fastllm.tokenizers.pretokenize import bert_spans, gpt2_spans

Merge = tuple[int, int, int]  # (left id, right id, merged id)
TextSource = Iterable["str | os.PathLike[str]"] | os.PathLike


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int
    min_frequency: int = 2
    special_tokens: tuple[str, ...] = ()
    limit_alphabet: int | None = None  # keep only the most frequent characters (not for byte-level BPE)
    show_progress: bool | None = None  # None: a progress bar only when stderr is a terminal


@dataclass
class MergeResult:
    vocab: list[str]  # token strings by id
    merges: list[Merge] = field(default_factory=list)


def iter_texts(source: TextSource, progress: Any = None) -> Iterator[str]:
    """Yields texts: str items as they are, files line by line (each line keeps its line ending)."""
    items = [source] if isinstance(source, os.PathLike) else source
    if isinstance(items, str):
        raise TypeError(
            "train() takes an iterable of texts or of paths, not a single str "
            "(wrap a text in a list, or pass a pathlib.Path for a file)"
        )
    for item in items:
        if isinstance(item, os.PathLike):
            yield from _iter_file(Path(item), progress)
        elif isinstance(item, str):
            if progress is not None:
                progress.update(len(item))
            yield item
        else:
            raise TypeError(
                f"train() input items must be str (a text) or os.PathLike (a file), got {type(item)}"
            )


def _iter_file(path: Path, progress: Any) -> Iterator[str]:
    if not path.is_file():
        raise FileNotFoundError(f"training file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if progress is not None:
                progress.update(len(raw))
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err})") from None


def source_size(source: TextSource) -> int | None:
    """Total bytes of the files in `source` (for a progress bar), None when it holds texts or is unsized."""
    files = [source] if isinstance(source, os.PathLike) else source
    if (
        not isinstance(files, (list, tuple))
        or not files
        or not all(isinstance(s, os.PathLike) for s in files)
    ):
        return None
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training file not found: {path}")
    return sum(os.path.getsize(s) for s in files)


def progress_bar(config: TrainConfig, total: int | None, desc: str, unit: str):
    if config.show_progress is False:
        return None
    from tqdm.auto import tqdm

    disable = None if config.show_progress is None else False
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=disable, leave=False)


def count_in_batches(
    texts: Iterable[str], add_batch: Callable[[list[str]], None], batch_chars: int = 1 << 20
):
    """Feeds texts to `add_batch` in lists of about `batch_chars` characters (bounded memory)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            add_batch(batch)
            batch, size = [], 0
    if batch:
        add_batch(batch)


def build_alphabet(
    word_counts: dict[str, int], config: TrainConfig, initial: Iterable[str] = ()
) -> list[str]:
    """Characters of the corpus (plus `initial`), cut to the `limit_alphabet` most frequent, by code point."""
    freq: Counter[str] = Counter()
    for word, count in word_counts.items():
        for ch in word:
            freq[ch] += count
    for ch in initial:
        freq[ch] = 1 << 62
    chars = sorted(freq)
    if config.limit_alphabet is not None and len(chars) > config.limit_alphabet:
        keep = sorted(chars, key=lambda c: (-freq[c], c))[: config.limit_alphabet]
        chars = sorted(keep)
    return chars


def initial_vocab(config: TrainConfig, alphabet: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Special tokens, then the alphabet, then `extra` forms; raises when vocab_size cannot hold them."""
    vocab: list[str] = []
    for token in (*config.special_tokens, *alphabet, *extra):
        if token not in vocab:
            vocab.append(token)
    if config.vocab_size < len(vocab):
        raise ValueError(
            f"vocab_size={config.vocab_size} is smaller than the alphabet: {len(config.special_tokens)} "
            f"special tokens + {len(vocab) - len(config.special_tokens)} initial symbols = {len(vocab)}; "
            f"raise vocab_size or set limit_alphabet"
        )
    return vocab


def merge_string(left: str, right: str, strip_prefix: str) -> str:
    if strip_prefix and right.startswith(strip_prefix):
        right = right[len(strip_prefix) :]
    return left + right


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[tuple[tuple[int, int], int]]:
    """Merges every (a, b) in `word` left to right, in place; returns the pair-count changes."""
    changes: list[tuple[tuple[int, int], int]] = []
    i = 0
    while i < len(word) - 1:
        if word[i] != a or word[i + 1] != b:
            i += 1
            continue
        changes.append(((a, b), -1))
        if i > 0:
            changes += [((word[i - 1], a), -1), ((word[i - 1], new), 1)]
        if i + 2 < len(word):
            changes += [((b, word[i + 2]), -1), ((new, word[i + 2]), 1)]
        word[i : i + 2] = [new]
        i += 1
    return changes


def train_merges(
    words: list[list[int]],
    counts: Sequence[int],
    vocab: list[str],
    vocab_size: int,
    min_frequency: int,
    strip_prefix: str = "",
    progress: Any = None,
) -> MergeResult:
    """The reference merge loop (see the module docstring); `words` are modified in place."""
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for wi, word in enumerate(words):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += counts[wi]
            where.setdefault(pair, set()).add(wi)
    heap = [(-c, pair) for pair, c in pair_counts.items() if c > 0]
    heapq.heapify(heap)
    index = {tok: i for i, tok in enumerate(vocab)}
    result = MergeResult(list(vocab))
    while len(index) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        current = pair_counts[pair]
        if -neg != current:
            if current > 0:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < max(min_frequency, 1):
            break
        new = _add_token(
            result, index, merge_string(result.vocab[pair[0]], result.vocab[pair[1]], strip_prefix)
        )
        result.merges.append((pair[0], pair[1], new))
        _apply_merge(words, counts, pair, new, pair_counts, where, heap)
        if progress is not None:
            progress.update(1)
    return result


def _add_token(result: MergeResult, index: dict[str, int], token: str) -> int:
    if token not in index:
        index[token] = len(result.vocab)
        result.vocab.append(token)
    return index[token]


def _apply_merge(words, counts, pair, new, pair_counts, where, heap) -> None:
    grown: set[tuple[int, int]] = set()
    for wi in sorted(where.pop(pair)):
        for changed, delta in _merge_word(words[wi], pair[0], pair[1], new):
            pair_counts[changed] += delta * counts[wi]
            if delta > 0:
                where.setdefault(changed, set()).add(wi)
                grown.add(changed)
    for changed in sorted(grown):
        if pair_counts[changed] > 0:
            heapq.heappush(heap, (-pair_counts[changed], changed))


# ---------------------------------------------------------------------------------------------- drivers
def count_words(
    source: TextSource,
    config: TrainConfig,
    normalizer: NormalizerConfig | None,
    backend: str,
    num_threads: int,
) -> dict[Any, int]:
    """Word counts: raw UTF-8 bytes of GPT-2 spans (normalizer None) or BERT-normalized words."""
    size = source_size(source)
    bar = progress_bar(config, size, "count words", "B" if size else "char")
    texts = iter_texts(source, bar)
    core = load_core() if backend == "core" else None
    if core is not None:
        n = normalizer or NormalizerConfig()
        counter = core.WordCounter(
            normalizer is None, n.clean_text, n.handle_chinese_chars, n.do_strip_accents, n.lowercase
        )
        count_in_batches(texts, lambda batch: counter.add(batch, num_threads))
        counts = dict(counter.items())
        if normalizer is not None:
            counts = {k.decode("utf-8"): v for k, v in counts.items()}
    else:
        counts = _count_python(texts, normalizer)
    if bar is not None:
        bar.close()
    return counts


def _count_python(texts: Iterable[str], normalizer: NormalizerConfig | None) -> dict[Any, int]:
    counts: Counter[Any] = Counter()
    for text in texts:
        if normalizer is None:
            counts.update(text[s:e].encode("utf-8") for s, e in gpt2_spans(text))
        else:
            norm, _ = normalize(text, normalizer)
            counts.update(norm[s:e] for s, e in bert_spans(norm))
    return dict(counts)


def run_merges(
    words: list[list[int]],
    counts: list[int],
    vocab: list[str],
    config: TrainConfig,
    strip_prefix: str,
    backend: str,
) -> MergeResult:
    """The merge loop, in C++ when backend == "core", with a progress bar over merges."""
    bar = progress_bar(config, max(config.vocab_size - len(vocab), 0), "merges", "merge")
    core = load_core() if backend == "core" else None
    if core is None:
        result = train_merges(
            words, counts, vocab, config.vocab_size, config.min_frequency, strip_prefix, bar
        )
    else:

        def report(done: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        tokens, merges = core.train_bpe(
            words,
            counts,
            [t.encode("utf-8") for t in vocab],
            config.vocab_size,
            config.min_frequency,
            strip_prefix.encode("utf-8"),
            report,
        )
        result = MergeResult([t.decode("utf-8") for t in tokens], [tuple(m) for m in merges])
    if bar is not None:
        bar.close()
    return result
