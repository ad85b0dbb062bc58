"""ByteLevelBPETokenizer against HuggingFace `tokenizers` and tiktoken with GPT-2's original files."""

from __future__ import annotations

import json

import pytest

from fastllm.tokenizers import ByteLevelBPETokenizer, load_tokenizer, read_tokenizer_json
from fastllm.tokenizers.unicode import bytes_to_unicode
from tests.tokenizers.conftest import encoding_fields, first_mismatch, require


@pytest.fixture
def gpt2(gpt2_files, backend) -> ByteLevelBPETokenizer:
    return ByteLevelBPETokenizer.from_files(*gpt2_files, backend=backend)


def test_gpt2_matches_huggingface(gpt2, hf_gpt2, corpus):
    ours = gpt2.encode_batch(corpus)
    theirs = hf_gpt2.encode_batch(corpus)
    assert [e.ids for e in ours] == [e.ids for e in theirs], first_mismatch(ours, theirs, corpus)
    assert [e.offsets for e in ours] == [e.offsets for e in theirs], first_mismatch(ours, theirs, corpus)
    assert [e.tokens for e in ours] == [e.tokens for e in theirs]


def test_gpt2_known_ids(gpt2):
    # GPT-2's published encoding of this sentence (also what tiktoken's "gpt2" gives)
    assert gpt2.encode("Hello world").ids == [15496, 995]
    assert gpt2.encode(" Hello world!!").ids == [18435, 995, 3228]


def test_gpt2_matches_tiktoken(gpt2, gpt2_files, corpus):
    tiktoken = require("tiktoken")
    encoder = json.loads(gpt2_files[0].read_text(encoding="utf-8"))
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != "<|endoftext|>"}
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding(
        "gpt2-local",
        pat_str=pat,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": encoder["<|endoftext|>"]},
    )
    assert gpt2.encode_ids(corpus) == enc.encode_ordinary_batch(corpus)


def test_decode_round_trip_and_hf_decode(gpt2, hf_gpt2, corpus):
    ids = gpt2.encode_ids(corpus)
    assert gpt2.decode_batch(ids) == corpus
    assert gpt2.decode_batch(ids) == hf_gpt2.decode_batch(ids)


def test_batch_threads_and_single_calls_agree(gpt2, corpus):
    one = gpt2.encode_batch(corpus, num_threads=1)
    many = gpt2.encode_batch(corpus, num_threads=3)
    assert [encoding_fields(e) for e in one] == [encoding_fields(e) for e in many]
    assert [encoding_fields(gpt2.encode(t)) for t in corpus[:50]] == [encoding_fields(e) for e in one[:50]]


def test_special_tokens_only_when_allowed(gpt2):
    text = "a<|endoftext|>b"
    plain = gpt2.encode(text)
    assert 50256 not in plain.ids
    assert gpt2.decode(plain.ids) == text
    allowed = gpt2.encode(text, allowed_special="all")
    assert allowed.ids == [64, 50256, 65]
    assert allowed.offsets == [(0, 1), (1, 14), (14, 15)]
    assert allowed.special_tokens_mask == [0, 1, 0]
    assert gpt2.decode(allowed.ids) == "ab"
    assert gpt2.decode(allowed.ids, skip_special_tokens=False) == text


def test_special_tokens_match_huggingface_when_allowed(gpt2, hf_gpt2):
    tk = require("tokenizers")
    hf_gpt2 = tk.Tokenizer.from_str(hf_gpt2.to_str())
    hf_gpt2.add_special_tokens(["<|endoftext|>"])
    texts = ["<|endoftext|>", "x <|endoftext|><|endoftext|> y", "no special", "<|endoftext"]
    ours = gpt2.encode_batch(texts, allowed_special={"<|endoftext|>"})
    assert [e.ids for e in ours] == [e.ids for e in hf_gpt2.encode_batch(texts)]


def test_save_load_and_hf_tokenizer_json(gpt2, tmp_path, corpus, backend):
    tk = require("tokenizers")
    gpt2.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt", "tokenizer.json"}
    hf = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    expected = gpt2.encode_ids(corpus)
    assert [e.ids for e in hf.encode_batch(corpus)] == expected
    assert load_tokenizer(tmp_path, backend).encode_ids(corpus) == expected
    (tmp_path / "tokenizer.json").unlink()
    native = ByteLevelBPETokenizer.load(tmp_path, backend)
    assert native.encode_ids(corpus) == expected
    assert native.vocab_size == 50257 and native.special_tokens == ["<|endoftext|>"]


def test_reads_huggingface_tokenizer_json(hf_gpt2, tmp_path, corpus, backend):
    path = tmp_path / "tokenizer.json"
    hf_gpt2.save(str(path))
    tok = read_tokenizer_json(path, backend)
    assert isinstance(tok, ByteLevelBPETokenizer)
    assert tok.encode_ids(corpus) == [e.ids for e in hf_gpt2.encode_batch(corpus)]


def test_long_words_use_the_heap_merge(gpt2, hf_gpt2):
    texts = ["=" * 1000, "ab" * 400, " " * 700 + "x", "1" * 500, "😀" * 100, "a" * 65, "a" * 64]
    assert gpt2.encode_ids(texts) == [e.ids for e in hf_gpt2.encode_batch(texts)]


def test_training_matches_huggingface(kjv, backend):
    tk = require("tokenizers")
    texts = [v + "\n" for v in kjv[:6000]]
    ours = ByteLevelBPETokenizer(backend=backend).train(texts, 3000, min_frequency=2, show_progress=False)
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=3000,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    model = json.loads(hf.to_str())["model"]
    assert ours.vocab_size == 3000
    assert ours.get_vocab() == model["vocab"]
    assert ours.merges == [tuple(m) for m in model["merges"]]
    assert ours.encode_ids(texts[:200]) == [e.ids for e in hf.encode_batch(texts[:200])]
