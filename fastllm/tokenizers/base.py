"""One interface for every tokenizer: `Tokenizer` (train, encode, decode, save, load) and `Encoding`.

Invariants:
- Token ids are exactly 0..vocab_size-1; `token_to_id` and `id_to_token` are inverse on them.
- Special tokens come first in training and are never produced from user text unless the caller allows them
  (`allowed_special`, "all" or a set of special token strings); an unknown special token is a ValueError.
- Every list of an `Encoding` has the same length. `offsets` are (start, end) character indices into the text
  the token came from (for a pair, the second sequence indexes the second text); special tokens added by the
  template and padding have (0, 0). special_tokens_mask is 1 for every special token, including those found in
  the text when allowed.
- Templates, truncation (longest_first / only_first / only_second, max_length counting the added special
  tokens) and padding (right side, type id 0) follow HuggingFace `tokenizers` (TemplateProcessing,
  truncate_encodings).
  Overflowing tokens (stride) are not kept.
- Results do not depend on the backend ("core" C++ or "python"), on the thread count or on PYTHONHASHSEED.
- While a large batch's results are built (`_gc_paused`), Python's cyclic garbage collector is paused and then
  restored to its previous state: the results hold only ints, strs and int pairs, which form no cycles, and
  each full collection triggered by ~10^5 new lists would traverse every object of the process (measured:
  60% of the time of encode_batch on the KJV corpus).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from fastllm.tokenizers import _native
from fastllm.tokenizers.files import check_ids
from fastllm.tokenizers.trainer import TextSource, TrainConfig

T = TypeVar("T", bound="Tokenizer")
TruncationArg = bool | Literal["longest_first", "only_first", "only_second"]
PaddingArg = bool | Literal["longest", "max_length"]
AllowedSpecial = Collection[str] | Literal["all"]
TOKENIZER_JSON = "tokenizer.json"


@dataclass(slots=True)
class Encoding:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    type_ids: list[int]
    attention_mask: list[int]
    special_tokens_mask: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Seq:
    """One encoded text before the template: ids, offsets and which ids are special tokens."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[int] = field(default_factory=list)

    def truncated(self, n: int) -> _Seq:
        return _Seq(self.ids[:n], self.offsets[:n], self.special[:n])


@dataclass(frozen=True)
class Template:
    """Where special tokens go around one or two sequences, like HuggingFace's TemplateProcessing.

    Items are "$A" / "$B" (the sequences) or a special token; a ":<n>" suffix sets the type id (default 0).
    """

    single: tuple[str, ...] = ("$A",)
    pair: tuple[str, ...] = ("$A", "$B:1")

    @staticmethod
    def parse(item: str) -> tuple[str, int]:
        m = re.fullmatch(r"(.+):(\d+)", item)
        return (m.group(1), int(m.group(2))) if m else (item, 0)

    @functools.cached_property
    def _parsed(self) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
        return tuple(map(self.parse, self.single)), tuple(map(self.parse, self.pair))

    def items(self, pair: bool) -> tuple[tuple[str, int], ...]:
        return self._parsed[1 if pair else 0]

    def special_tokens(self) -> set[str]:
        names = {self.parse(i)[0] for i in (*self.single, *self.pair)}
        return names - {"$A", "$B"}

    def num_special(self, pair: bool) -> int:
        return sum(name not in ("$A", "$B") for name, _ in self.items(pair))

    def validate(self) -> None:
        for pattern, want in ((self.single, ["$A"]), (self.pair, ["$A", "$B"])):
            seqs = [self.parse(i)[0] for i in pattern if self.parse(i)[0] in ("$A", "$B")]
            if seqs != want:
                raise ValueError(f"template {pattern} must contain the sequences {want} once each, in order")


def truncate_pair(a: _Seq, b: _Seq | None, limit: int, strategy: str) -> tuple[_Seq, _Seq | None]:
    """HuggingFace's truncate_encodings for sequences that must fit in `limit` ids together."""
    if limit < 0:
        raise ValueError("max_length is smaller than the number of special tokens the template adds")
    total = len(a.ids) + (len(b.ids) if b is not None else 0)
    if total <= limit:
        return a, b
    if strategy == "longest_first":
        if b is None:
            return a.truncated(limit), None
        n1, n2 = _longest_first(len(a.ids), len(b.ids), limit)
        return a.truncated(n1), b.truncated(n2)
    if strategy == "only_second" and b is None:
        raise ValueError("truncation='only_second' needs a pair of sequences")
    target = a if strategy == "only_first" else b
    keep = len(target.ids) - (total - limit)
    if keep <= 0:
        raise ValueError(f"truncation={strategy!r}: that sequence is too short to fit max_length")
    return (a.truncated(keep), b) if strategy == "only_first" else (a, b.truncated(keep))


def _longest_first(len_a: int, len_b: int, limit: int) -> tuple[int, int]:
    n1, n2 = min(len_a, len_b), max(len_a, len_b)
    n2 = n1 if n1 > limit else max(n1, limit - n1)
    if n1 + n2 > limit:
        n1 = limit // 2
        n2 = n1 + limit % 2
    return (n2, n1) if len_a > len_b else (n1, n2)


class Tokenizer(ABC):
    """Base of BPETokenizer, ByteLevelBPETokenizer and WordPieceTokenizer (see the module docstring)."""

    kind: ClassVar[str]
    default_special_tokens: ClassVar[tuple[str, ...]] = ()
    default_template: ClassVar[Template] = Template()
    default_unk: ClassVar[str | None] = None
    default_pad: ClassVar[str | None] = None
    requires_unk: ClassVar[bool] = False

    def __init__(
        self,
        *,
        special_tokens: Sequence[str] | None,
        template: Template | None,
        unk_token: str | None,
        pad_token: str | None,
        backend: str,
    ) -> None:
        self.backend = _native.resolve(backend)
        self._requested = (special_tokens, template)
        self._single_template: list[tuple[int, int]] = []
        self._requested_roles = {"unk_token": unk_token, "pad_token": pad_token}
        self.unk_token: str | None = None
        self.pad_token: str | None = None
        self._vocab: dict[str, int] = {}
        self._itos: list[str] = []
        self.special_tokens: list[str] = []
        self._special_ids: frozenset[int] = frozenset()
        self.template = Template()
        self._engine: Any = None
        self._special_res: dict[frozenset[str], re.Pattern[str]] = {}

    # ------------------------------------------------------------------ vocabulary
    def _set_vocab(self, vocab: dict[str, int], source: str) -> None:
        """Installs a vocabulary, validates the special tokens and template against it, builds the engine."""
        check_ids(vocab, source)
        self._vocab = dict(vocab)
        self._itos = [""] * len(vocab)
        for token, idx in vocab.items():
            self._itos[idx] = token
        specials, template = self._requested
        if specials is None:
            specials = [t for t in self.default_special_tokens if t in vocab]
        for token in specials:
            if token not in vocab:
                raise ValueError(f"unknown special token {token!r}: not in the vocabulary ({source})")
        self.special_tokens = list(dict.fromkeys(specials))
        self._special_ids = frozenset(vocab[t] for t in self.special_tokens)
        self.template = self._choose_template(template)
        self._single_template = [
            (-1 if name == "$A" else vocab[name], type_id)
            for name, type_id in self.template.items(pair=False)
        ]
        for role, default in (("unk_token", self.default_unk), ("pad_token", self.default_pad)):
            setattr(self, role, self._resolve_role(role, default, source))
        if self.requires_unk and self.unk_token is None:
            raise ValueError(
                f"{type(self).__name__} needs an unknown token: {self.default_unk!r} is not in the "
                f"vocabulary ({source}); pass unk_token=..."
            )
        self._engine = self._make_engine()
        self._special_res = {}

    def _resolve_role(self, role: str, default: str | None, source: str) -> str | None:
        """An explicit unk/pad token must be in the vocabulary; the default one is used when it is."""
        token = self._requested_roles[role]
        if token is None:
            return default if default in self._vocab else None
        if token not in self._vocab:
            raise ValueError(f"{role}={token!r} is not in the vocabulary ({source})")
        return token

    def _choose_template(self, template: Template | None) -> Template:
        if template is None:
            default = self.default_template
            template = default if default.special_tokens() <= set(self.special_tokens) else Template()
        template.validate()
        unknown = template.special_tokens() - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"unknown special token(s) {sorted(unknown)} in the template; special tokens are "
                f"{self.special_tokens}"
            )
        return template

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._itos[idx] if 0 <= idx < len(self._itos) else None

    def _require_vocab(self) -> None:
        if not self._itos:
            raise RuntimeError(f"{type(self).__name__} has no vocabulary yet: train() or load() it first")

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _make_engine(self) -> Any:
        """An engine of fastllm.tokenizers.reference's interface (or _native.CoreEngine)."""

    @abstractmethod
    def _decode_tokens(self, tokens: list[str]) -> str: ...

    @abstractmethod
    def _train(self, source: TextSource, config: TrainConfig, num_threads: int) -> None: ...

    @abstractmethod
    def _save_native(self, directory: Path) -> None: ...

    @classmethod
    @abstractmethod
    def _load_native(cls: type[T], directory: Path, backend: str) -> T: ...

    # ------------------------------------------------------------------ training
    def train(
        self: T,
        texts_or_files: TextSource,
        vocab_size: int,
        min_frequency: int = 2,
        special_tokens: Sequence[str] | None = None,
        *,
        limit_alphabet: int | None = None,
        show_progress: bool | None = None,
        num_threads: int | None = None,
    ) -> T:
        """Learns the vocabulary from texts (str items) or files (pathlib.Path items), streamed."""
        specials = tuple(self.default_special_tokens if special_tokens is None else special_tokens)
        if vocab_size <= 0 or min_frequency < 0:
            raise ValueError(
                f"vocab_size must be > 0 and min_frequency >= 0, got {vocab_size}, {min_frequency}"
            )
        self._requested = (list(specials), self._requested[1])
        config = TrainConfig(vocab_size, min_frequency, specials, limit_alphabet, show_progress)
        self._train(texts_or_files, config, _threads(num_threads))
        return self

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        text: str,
        pair: str | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: TruncationArg = False,
        padding: PaddingArg = False,
        allowed_special: AllowedSpecial = (),
    ) -> Encoding:
        """Encodes one text, or a pair (`[CLS] a [SEP] b [SEP]` with the BERT template)."""
        item = text if pair is None else (text, pair)
        return self.encode_batch(
            [item], add_special_tokens, max_length, truncation, padding, allowed_special, 1
        )[0]

    def encode_batch(
        self,
        inputs: Sequence[str | tuple[str, str]],
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: TruncationArg = False,
        padding: PaddingArg = False,
        allowed_special: AllowedSpecial = (),
        num_threads: int | None = None,
    ) -> list[Encoding]:
        """Encodes texts or (text, pair) tuples; results in input order, independent of num_threads."""
        self._require_vocab()
        strategy = _truncation_strategy(truncation, max_length)
        self._check_padding(padding, max_length)
        allowed = self._allowed(allowed_special)
        threads = _threads(num_threads)
        if not allowed and strategy is None and all(isinstance(x, str) for x in inputs):
            out = self._encode_singles(list(inputs), add_special_tokens, threads)
        else:
            out = self._encode_general(inputs, add_special_tokens, max_length, strategy, allowed, threads)
        self._pad(out, padding, max_length)
        return out

    def _encode_singles(self, texts: list[str], add_special: bool, threads: int) -> list[Encoding]:
        """Fast path: single texts, no special tokens in them, no truncation; the engine builds the fields."""
        template = self._single_template if add_special else [(-1, 0)]
        with _gc_paused(len(texts)):
            fields = self._engine.encode_full(texts, template, self._itos, threads)
            return [Encoding(*f) for f in fields]

    def _encode_general(
        self,
        inputs: Sequence[str | tuple[str, str]],
        add_special: bool,
        max_length: int | None,
        strategy: str | None,
        allowed: frozenset[str],
        threads: int,
    ) -> list[Encoding]:
        firsts = [x[0] if isinstance(x, tuple) else x for x in inputs]
        seconds = [x[1] for x in inputs if isinstance(x, tuple)]
        seqs = self._encode_sequences(firsts + seconds, allowed, threads)
        second_of = iter(seqs[len(firsts) :])
        return [
            self._post_process(
                seq, next(second_of) if isinstance(x, tuple) else None, add_special, max_length, strategy
            )
            for seq, x in zip(seqs, inputs)
        ]

    def encode_ids(
        self, texts: Sequence[str], add_special_tokens: bool = False, num_threads: int | None = None
    ) -> list[list[int]]:
        """Ids only, for data pipelines: no offsets, no Encoding objects, no special tokens in the text."""
        self._require_vocab()
        with _gc_paused(len(texts)):
            results = self._engine.encode_ids(list(texts), _threads(num_threads))
            if not add_special_tokens:
                return results
            items = self.template.items(pair=False)
            return [self._template_ids(items, ids) for ids in results]

    def _template_ids(self, items: list[tuple[str, int]], ids: list[int]) -> list[int]:
        out: list[int] = []
        for name, _ in items:
            out.extend(ids if name == "$A" else (self._vocab[name],))
        return out

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str):
            raise TypeError("allowed_special must be 'all' or a collection of special token strings")
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"unknown special token(s) {sorted(unknown)}; special tokens are {self.special_tokens}"
            )
        return frozenset(allowed_special)

    def _special_re(self, allowed: frozenset[str]) -> re.Pattern[str]:
        if allowed not in self._special_res:  # longest first: the leftmost-longest match, as HuggingFace
            self._special_res[allowed] = re.compile(
                "|".join(map(re.escape, sorted(allowed, key=lambda t: (-len(t), t))))
            )
        return self._special_res[allowed]

    def _encode_sequences(self, texts: list[str], allowed: frozenset[str], num_threads: int) -> list[_Seq]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode() takes str texts, got {type(text).__name__}")
        if not allowed:
            results = self._engine.encode_texts(texts, True, num_threads)
            return [_Seq(ids, offs, [0] * len(ids)) for ids, offs in results]
        return self._encode_with_specials(texts, self._special_re(allowed), num_threads)

    def _encode_with_specials(
        self, texts: list[str], pattern: re.Pattern[str], num_threads: int
    ) -> list[_Seq]:
        plan: list[list[tuple[int, int, bool]]] = []  # per text: (start, end, is_special)
        plain: list[str] = []
        for text in texts:
            parts, pos = [], 0
            for m in pattern.finditer(text):
                parts += [(pos, m.start(), False), (m.start(), m.end(), True)]
                pos = m.end()
            parts.append((pos, len(text), False))
            plain += [text[s:e] for s, e, special in parts if not special and e > s]
            plan.append(parts)
        results = iter(self._engine.encode_texts(plain, True, num_threads))
        return [self._assemble(text, parts, results) for text, parts in zip(texts, plan)]

    def _assemble(self, text: str, parts: list[tuple[int, int, bool]], results) -> _Seq:
        seq = _Seq([], [], [])
        for start, end, special in parts:
            if special:
                seq.ids.append(self._vocab[text[start:end]])
                seq.offsets.append((start, end))
                seq.special.append(1)
            elif end > start:
                ids, offs = next(results)
                seq.ids += ids
                seq.offsets += [(s + start, e + start) for s, e in offs]
                seq.special += [0] * len(ids)
        return seq

    def _post_process(
        self, a: _Seq, b: _Seq | None, add_special: bool, max_length: int | None, strategy: str | None
    ) -> Encoding:
        if strategy is not None:
            n_added = self.template.num_special(b is not None) if add_special else 0
            a, b = truncate_pair(a, b, max_length - n_added, strategy)
        if add_special:
            parts = [
                (a if name == "$A" else b if name == "$B" else name, type_id)
                for name, type_id in self.template.items(b is not None)
            ]
        else:
            parts = [(a, 0)] + ([(b, 1)] if b is not None else [])
        return self._build(parts)

    def _build(self, parts: list[tuple[_Seq | str, int]]) -> Encoding:
        """Concatenates sequences and special tokens (str) with their type ids into an Encoding."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        type_ids: list[int] = []
        special: list[int] = []
        for part, type_id in parts:
            if isinstance(part, str):
                ids.append(self._vocab[part])
                offsets.append((0, 0))
                type_ids.append(type_id)
                special.append(1)
            else:
                ids += part.ids
                offsets += part.offsets
                type_ids += [type_id] * len(part.ids)
                special += part.special
        itos = self._itos
        return Encoding(ids, [itos[i] for i in ids], offsets, type_ids, [1] * len(ids), special)

    def _check_padding(self, padding: PaddingArg, max_length: int | None) -> None:
        if padding is False:
            return
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if self.pad_token is None:
            raise ValueError(f"{type(self).__name__} has no pad token; pass pad_token=... to pad")

    def _pad(self, encodings: list[Encoding], padding: PaddingArg, max_length: int | None) -> None:
        """Right-pads to max_length ("max_length") or to the longest encoding (True / "longest")."""
        if padding is False:
            return
        target = max_length if padding == "max_length" else max((len(e) for e in encodings), default=0)
        pad_id = self._vocab[self.pad_token]
        for enc in encodings:
            k = max(target - len(enc), 0)
            enc.ids += [pad_id] * k
            enc.tokens += [self.pad_token] * k
            enc.offsets += [(0, 0)] * k
            enc.type_ids += [0] * k
            enc.attention_mask += [0] * k
            enc.special_tokens_mask += [1] * k

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self._require_vocab()
        tokens = []
        for idx in ids:
            if not 0 <= idx < len(self._itos):
                raise ValueError(f"id {idx} is out of range for a vocabulary of {len(self._itos)} tokens")
            if not (skip_special_tokens and idx in self._special_ids):
                tokens.append(self._itos[idx])
        return self._decode_tokens(tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the model's files (vocab.json + merges.txt or vocab.txt) and a HF tokenizer.json."""
        from fastllm.tokenizers import hf_json

        self._require_vocab()
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._save_native(path)
        hf_json.write_tokenizer_json(self, path / TOKENIZER_JSON)
        return path

    @classmethod
    def load(cls: type[T], directory: str | os.PathLike, backend: str = "auto") -> T:
        """Reads tokenizer.json when the folder has one, else the model's own files."""
        from fastllm.tokenizers import hf_json

        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {path}")
        if (path / TOKENIZER_JSON).is_file():
            tok = hf_json.read_tokenizer_json(path / TOKENIZER_JSON, backend)
            if not isinstance(tok, cls):
                raise ValueError(
                    f"{path / TOKENIZER_JSON} holds a {type(tok).__name__}, not a {cls.__name__}"
                )
            return tok
        return cls._load_native(path, backend)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, backend={self.backend!r})"


@contextlib.contextmanager
def _gc_paused(batch_size: int, threshold: int = 256):
    """Pauses the cyclic GC while a batch of `threshold`+ results is built (see the module docstring)."""
    pause = batch_size >= threshold and gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause:
            gc.enable()


def _truncation_strategy(truncation: TruncationArg, max_length: int | None) -> str | None:
    if truncation is False:
        return None
    strategy = "longest_first" if truncation is True else truncation
    if strategy not in ("longest_first", "only_first", "only_second"):
        raise ValueError(
            f"truncation must be a bool, 'longest_first', 'only_first' or 'only_second', got {truncation!r}"
        )
    if max_length is None:
        raise ValueError("truncation needs max_length")
    return strategy


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        return min(8, os.cpu_count() or 1)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return num_threads
