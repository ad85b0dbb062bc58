"""Bad input gives a clear error that names the file, key or value."""

from __future__ import annotations

import json

import pytest

from fastllm.tokenizers import (
    BPETokenizer,
    ByteLevelBPETokenizer,
    Template,
    WordPieceTokenizer,
    load_tokenizer,
    read_tokenizer_json,
)
from fastllm.tokenizers.unicode import bytes_to_unicode

BYTE_VOCAB = {ch: i for i, ch in enumerate(sorted(bytes_to_unicode().values()))}


def _write_gpt2(tmp_path, vocab: dict, merges: str):
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges, encoding="utf-8")
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab file not found: .*nope.json"):
        ByteLevelBPETokenizer.from_files(tmp_path / "nope.json", tmp_path / "merges.txt")
    vocab, _ = _write_gpt2(tmp_path, BYTE_VOCAB, "")
    with pytest.raises(FileNotFoundError, match="merges file not found: .*missing.txt"):
        ByteLevelBPETokenizer.from_files(vocab, tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="vocab file not found"):
        WordPieceTokenizer.from_vocab_txt(tmp_path / "vocab.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        load_tokenizer(empty)


def test_malformed_vocab_json(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.json: not a valid JSON vocabulary"):
        ByteLevelBPETokenizer.from_files(path, path)
    path.write_text(json.dumps({"a": 0, "b": "1"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.json: id of 'b' must be an integer, got '1'"):
        ByteLevelBPETokenizer.from_files(path, path)
    path.write_text(json.dumps({"a": 0, "b": 2}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.json: ids must be 0..1; id 1 is missing"):
        ByteLevelBPETokenizer.from_files(path, path)
    path.write_text(json.dumps({"a": 0, "b": 0}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"id 0 is used by both 'a' and 'b'"):
        ByteLevelBPETokenizer.from_files(path, path)


def test_malformed_merges(tmp_path):
    vocab = dict(BYTE_VOCAB, ab=256)
    v, m = _write_gpt2(tmp_path, vocab, "#version: 0.2\na b\na b c\n")
    with pytest.raises(
        ValueError, match=r"merges.txt:3: expected two tokens separated by one space, got 'a b c'"
    ):
        ByteLevelBPETokenizer.from_files(v, m)
    v, m = _write_gpt2(tmp_path, vocab, "a b\nb a\n")
    with pytest.raises(ValueError, match=r"merge #1 \('b', 'a'\) uses 'ba', which is not in the vocab"):
        ByteLevelBPETokenizer.from_files(v, m)


def test_byte_level_vocab_must_cover_bytes(tmp_path):
    kept = [ch for b, ch in sorted(bytes_to_unicode().items()) if b != 0xFF]
    vocab = {ch: i for i, ch in enumerate(kept)}
    v, m = _write_gpt2(tmp_path, vocab, "")
    with pytest.raises(ValueError, match=r"lacks 'ÿ', the token of byte 0xff"):
        ByteLevelBPETokenizer.from_files(v, m)
    v, m = _write_gpt2(tmp_path, dict(BYTE_VOCAB, **{"[weird]\u2603": 256}), "")
    with pytest.raises(
        ValueError, match=r"token '\[weird\]☃' \(id 256\) has the character '☃'.*special token"
    ):
        ByteLevelBPETokenizer.from_files(v, m)


def test_vocab_txt_errors(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[UNK]\nhello\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.txt:3: duplicate token 'hello' \(first on line 2\)"):
        WordPieceTokenizer.from_vocab_txt(path)
    path.write_text("hello\nworld\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"needs an unknown token: '\[UNK\]' is not in the vocabulary"):
        WordPieceTokenizer.from_vocab_txt(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        WordPieceTokenizer.from_vocab_txt(path)


def test_unknown_special_tokens():
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3}
    with pytest.raises(ValueError, match=r"unknown special token '<s>': not in the vocabulary"):
        WordPieceTokenizer(vocab, special_tokens=["[UNK]", "<s>"])
    tok = WordPieceTokenizer(vocab, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    with pytest.raises(ValueError, match=r"unknown special token\(s\) \['\[MASK\]'\]"):
        tok.encode("a", allowed_special={"[MASK]"})
    with pytest.raises(ValueError, match=r"unknown special token\(s\) \['<x>'\] in the template"):
        WordPieceTokenizer(vocab, special_tokens=["[UNK]"], template=Template(("<x>", "$A")))
    with pytest.raises(ValueError, match=r"pad_token='\[PAD\]' is not in the vocabulary"):
        WordPieceTokenizer(vocab, pad_token="[PAD]")
    with pytest.raises(ValueError, match="has no pad token"):
        tok.encode("a", padding="max_length", max_length=4)


def test_vocab_size_smaller_than_alphabet():
    with pytest.raises(
        ValueError, match=r"vocab_size=100 is smaller than the alphabet: 1 special tokens \+ 256"
    ):
        ByteLevelBPETokenizer().train(["hello"], 100, show_progress=False)
    with pytest.raises(ValueError, match=r"vocab_size=8 is smaller than the alphabet: 5 special tokens \+ 7"):
        WordPieceTokenizer().train(["abc abd"], 8, show_progress=False)
    with pytest.raises(ValueError, match=r"vocab_size=6 is smaller than the alphabet"):
        BPETokenizer().train(["xyz"], 6, show_progress=False)


def test_bad_arguments(tmp_path):
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "a": 4}
    tok = WordPieceTokenizer(vocab)
    with pytest.raises(ValueError, match="truncation needs max_length"):
        tok.encode("a", truncation=True)
    with pytest.raises(ValueError, match="smaller than the number of special tokens"):
        tok.encode("a", max_length=1, truncation=True)
    with pytest.raises(ValueError, match="id 99 is out of range for a vocabulary of 5"):
        tok.decode([1, 99])
    with pytest.raises(TypeError, match="takes str texts"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a single str"):
        WordPieceTokenizer().train("a text", 100)
    with pytest.raises(ValueError, match="backend must be one of"):
        WordPieceTokenizer(vocab, backend="gpu")
    with pytest.raises(RuntimeError, match="no vocabulary yet"):
        WordPieceTokenizer().encode("a")
    with pytest.raises(FileNotFoundError, match="training file not found"):
        WordPieceTokenizer().train([tmp_path / "absent.txt"], 100)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: not valid UTF-8"):
        WordPieceTokenizer().train([bad], 100, show_progress=False)


def test_unsupported_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer.json: model.type = 'Unigram' is not supported"):
        read_tokenizer_json(path)
    data = {
        "model": {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"},
        "normalizer": {"type": "NFKC"},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"normalizer.type = 'NFKC' is not supported"):
        read_tokenizer_json(path)
    path.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json: not valid JSON"):
        read_tokenizer_json(path)
