"""HuggingFace tokenizer.json: read the three supported model types, write one HuggingFace loads identically.

Invariants:
- Supported: model BPE with a ByteLevel pre-tokenizer (-> ByteLevelBPETokenizer), model BPE with an
  end-of-word suffix and BertPreTokenizer (-> BPETokenizer), model WordPiece with BertPreTokenizer
  (-> WordPieceTokenizer);
  normalizer BertNormalizer or null; post-processor TemplateProcessing, BertProcessing, ByteLevel or null.
  Anything else raises ValueError naming the file, the key and the value (never a silent approximation).
- Special added tokens become the tokenizer's special tokens (in id order); non-special added tokens are
  rejected. Truncation and padding stored in the file are ignored: they are arguments of encode().
- `to_tokenizer_json(tok)` encodes like `tok` when loaded by HuggingFace `tokenizers` (tests check it), for
  text without special tokens; HuggingFace always matches special tokens in text, fastllm only when allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastllm.tokenizers.base import Template, Tokenizer
from fastllm.tokenizers.normalization import NormalizerConfig

_NULL_NORMALIZER = NormalizerConfig(
    clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False
)


# ---------------------------------------------------------------------------------------------- writing
def write_tokenizer_json(tok: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_tokenizer_json(tok), ensure_ascii=False, indent=1), encoding="utf-8")


def to_tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    vocab = tok.get_vocab()
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            _added_token(t, vocab[t]) for t in sorted(tok.special_tokens, key=vocab.__getitem__)
        ],
        "normalizer": _normalizer_json(tok),
        "pre_tokenizer": _BYTE_LEVEL if tok.kind == "byte_bpe" else {"type": "BertPreTokenizer"},
        "post_processor": _post_processor_json(tok),
        "decoder": _decoder_json(tok),
        "model": _model_json(tok, vocab),
    }


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}


def _added_token(content: str, idx: int) -> dict[str, Any]:
    return {
        "id": idx,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _normalizer_json(tok: Tokenizer) -> dict[str, Any] | None:
    if tok.kind == "byte_bpe":
        return None
    n: NormalizerConfig = tok.normalizer  # type: ignore[attr-defined]
    return {
        "type": "BertNormalizer",
        "clean_text": n.clean_text,
        "handle_chinese_chars": n.handle_chinese_chars,
        "strip_accents": n.strip_accents,
        "lowercase": n.lowercase,
    }


def _post_processor_json(tok: Tokenizer) -> dict[str, Any]:
    if tok.kind == "byte_bpe" and tok.template == Template():
        return dict(_BYTE_LEVEL)
    vocab = tok.get_vocab()

    def items(pattern: tuple[str, ...]) -> list[dict[str, Any]]:
        out = []
        for name, type_id in (Template.parse(i) for i in pattern):
            if name in ("$A", "$B"):
                out.append({"Sequence": {"id": name[1], "type_id": type_id}})
            else:
                out.append({"SpecialToken": {"id": name, "type_id": type_id}})
        return out

    specials = sorted(tok.template.special_tokens())
    return {
        "type": "TemplateProcessing",
        "single": items(tok.template.single),
        "pair": items(tok.template.pair),
        "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in specials},
    }


def _decoder_json(tok: Tokenizer) -> dict[str, Any]:
    if tok.kind == "byte_bpe":
        return dict(_BYTE_LEVEL)
    if tok.kind == "bpe":
        return {"type": "BPEDecoder", "suffix": tok.suffix}  # type: ignore[attr-defined]
    return {"type": "WordPiece", "prefix": tok.prefix, "cleanup": tok.cleanup}  # type: ignore[attr-defined]


def _model_json(tok: Tokenizer, vocab: dict[str, int]) -> dict[str, Any]:
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    if tok.kind == "wordpiece":
        return {
            "type": "WordPiece",
            "unk_token": tok.unk_token,
            "continuing_subword_prefix": tok.prefix,
            "max_input_chars_per_word": tok.max_input_chars_per_word,
            "vocab": ordered,
        }  # type: ignore
    merges = tok.merges  # type: ignore[attr-defined]
    spaced = any(" " in part for pair in merges for part in pair)
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": tok.unk_token,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": tok.suffix if tok.kind == "bpe" else None,  # type: ignore[attr-defined]
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": ordered,
        "merges": [list(p) for p in merges] if spaced else [f"{a} {b}" for a, b in merges],
    }


# ---------------------------------------------------------------------------------------------- reading
class _Reader:
    """Reads one tokenizer.json; every error names the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            self.data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(self.data, dict) or not isinstance(self.data.get("model"), dict):
            raise ValueError(f"{path}: expected a JSON object with a 'model' object")

    def fail(self, key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{self.path}: {key} = {value!r} is not supported (expected {expected})")

    def section(self, key: str) -> dict[str, Any] | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.fail(key, value, "an object or null")
        return value

    def type_of(self, key: str) -> str | None:
        section = self.section(key)
        return None if section is None else section.get("type")

    def normalizer(self) -> NormalizerConfig:
        n = self.section("normalizer")
        if n is None:
            return _NULL_NORMALIZER
        if n.get("type") != "BertNormalizer":
            raise self.fail("normalizer.type", n.get("type"), "BertNormalizer or a null normalizer")
        return NormalizerConfig(
            bool(n.get("clean_text", True)),
            bool(n.get("handle_chinese_chars", True)),
            n.get("strip_accents"),
            bool(n.get("lowercase", True)),
        )

    def special_tokens(self) -> tuple[list[str], dict[str, int]]:
        specials, extra = [], {}
        for i, added in enumerate(sorted(self.data.get("added_tokens") or [], key=lambda a: a.get("id", -1))):
            if not added.get("special", False):
                raise self.fail(f"added_tokens[{i}].special", False, "special added tokens only")
            specials.append(added["content"])
            extra[added["content"]] = added["id"]
        return specials, extra

    def vocab(self, extra: dict[str, int]) -> dict[str, int]:
        vocab = self.data["model"].get("vocab")
        if isinstance(vocab, list):  # older files: [[token, score], ...] are not BPE/WordPiece
            raise self.fail("model.vocab", "<list>", "an object token -> id")
        if not isinstance(vocab, dict):
            raise self.fail("model.vocab", vocab, "an object token -> id")
        vocab = dict(vocab)
        for token, idx in extra.items():
            vocab.setdefault(token, idx)
        return vocab

    def merges(self) -> list[tuple[str, str]]:
        out = []
        for i, m in enumerate(self.data["model"].get("merges") or []):
            parts = m.split(" ") if isinstance(m, str) else m
            if not isinstance(parts, list) or len(parts) != 2:
                raise self.fail(f"model.merges[{i}]", m, "'left right' or [left, right]")
            out.append((parts[0], parts[1]))
        return out

    def template(self, specials: list[str]) -> Template | None:
        post = self.section("post_processor")
        if post is None or post.get("type") == "ByteLevel":
            return Template()
        if post.get("type") == "BertProcessing":
            cls, sep = post["cls"][0], post["sep"][0]
            return Template((cls, "$A", sep), (cls, "$A", sep, "$B:1", f"{sep}:1"))
        if post.get("type") != "TemplateProcessing":
            raise self.fail(
                "post_processor.type", post.get("type"), "TemplateProcessing, BertProcessing, ByteLevel"
            )
        return Template(self._pattern(post, "single"), self._pattern(post, "pair"))

    def _pattern(self, post: dict[str, Any], key: str) -> tuple[str, ...]:
        out = []
        for item in post.get(key) or []:
            kind, body = next(iter(item.items()))
            name = f"${body['id']}" if kind == "Sequence" else body["id"]
            if kind == "SpecialToken" and len(post["special_tokens"][name]["ids"]) != 1:
                raise self.fail(
                    f"post_processor.special_tokens[{name!r}].ids",
                    post["special_tokens"][name]["ids"],
                    "one id per special token",
                )
            out.append(name if body.get("type_id", 0) == 0 else f"{name}:{body['type_id']}")
        return tuple(out)


def read_tokenizer_json(path: str | Path, backend: str = "auto") -> Tokenizer:
    """A fastllm tokenizer equivalent to the HuggingFace tokenizer.json at `path`."""
    r = _Reader(Path(path))
    model = r.data["model"]
    if model.get("type") not in ("WordPiece", "BPE"):
        raise r.fail("model.type", model.get("type"), "BPE or WordPiece")
    specials, extra = r.special_tokens()
    vocab = r.vocab(extra)
    template = r.template(specials)
    kind = model.get("type")
    if kind == "WordPiece":
        return _read_wordpiece(r, model, vocab, specials, template, backend)
    if kind == "BPE":
        _check_bpe_options(r, model)
        if r.type_of("pre_tokenizer") == "ByteLevel":
            return _read_byte_bpe(r, vocab, specials, template, backend)
        return _read_bpe(r, model, vocab, specials, template, backend)
    raise AssertionError(kind)


def _read_wordpiece(r: _Reader, model, vocab, specials, template, backend) -> Tokenizer:
    from fastllm.tokenizers.wordpiece import WordPieceTokenizer

    if r.type_of("pre_tokenizer") != "BertPreTokenizer":
        raise r.fail("pre_tokenizer.type", r.type_of("pre_tokenizer"), "BertPreTokenizer for WordPiece")
    n = r.normalizer()
    decoder = r.section("decoder") or {}
    tok = WordPieceTokenizer(
        lowercase=n.lowercase,
        strip_accents=n.strip_accents,
        clean_text=n.clean_text,
        handle_chinese_chars=n.handle_chinese_chars,
        max_input_chars_per_word=model.get("max_input_chars_per_word", 100),
        prefix=model.get("continuing_subword_prefix") or "##",
        cleanup=decoder.get("cleanup", True),
        special_tokens=specials,
        template=template,
        unk_token=model.get("unk_token"),
        backend=backend,
    )
    tok._set_vocab(vocab, str(r.path))
    return tok


def _check_bpe_options(r: _Reader, model: dict[str, Any]) -> None:
    for key, ok in (
        ("dropout", None),
        ("byte_fallback", False),
        ("ignore_merges", False),
        ("fuse_unk", False),
    ):
        if model.get(key) not in (None, ok):
            raise r.fail(f"model.{key}", model.get(key), repr(ok))
    if model.get("continuing_subword_prefix"):
        raise r.fail("model.continuing_subword_prefix", model["continuing_subword_prefix"], "null or ''")


def _read_byte_bpe(r: _Reader, vocab, specials, template, backend) -> Tokenizer:
    from fastllm.tokenizers.byte_bpe import ByteLevelBPETokenizer

    pre = r.section("pre_tokenizer") or {}
    if pre.get("add_prefix_space", False) or not pre.get("use_regex", True):
        raise r.fail("pre_tokenizer", pre, "ByteLevel with add_prefix_space=false and use_regex=true")
    if r.section("normalizer") is not None:
        raise r.fail("normalizer", r.section("normalizer"), "null for a byte-level BPE")
    tok = ByteLevelBPETokenizer(special_tokens=specials, template=template, backend=backend)
    tok._set_model(vocab, r.merges(), str(r.path))
    return tok


def _read_bpe(r: _Reader, model, vocab, specials, template, backend) -> Tokenizer:
    from fastllm.tokenizers.bpe import BPETokenizer

    if r.type_of("pre_tokenizer") != "BertPreTokenizer":
        raise r.fail(
            "pre_tokenizer.type", r.type_of("pre_tokenizer"), "ByteLevel or BertPreTokenizer for BPE"
        )
    if not model.get("end_of_word_suffix"):
        raise r.fail("model.end_of_word_suffix", model.get("end_of_word_suffix"), "a suffix such as '</w>'")
    tok = BPETokenizer(
        normalizer=r.normalizer(),
        suffix=model["end_of_word_suffix"],
        special_tokens=specials,
        template=template,
        unk_token=model.get("unk_token"),
        backend=backend,
    )
    tok._set_model(vocab, r.merges(), str(r.path))
    return tok
