"""Classic BPE (BPETokenizer): training on the KJV Bible, files, save/load, HF tokenizer.json parity."""

from __future__ import annotations

import pytest

from fastllm.tokenizers import BPETokenizer, load_tokenizer
from tests.tokenizers.conftest import encoding_fields, require, require_core


@pytest.fixture(scope="module")
def kjv_bpe(kjv) -> BPETokenizer:
    return BPETokenizer(backend="core" if _core_available() else "python").train(
        kjv, 8000, min_frequency=2, show_progress=False
    )


def _core_available() -> bool:
    from fastllm.tokenizers import _native

    return _native.load_core() is not None


def test_training_reaches_vocab_size(kjv_bpe):
    tok = kjv_bpe
    assert tok.vocab_size == 8000
    assert [tok.id_to_token(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    vocab = tok.get_vocab()
    assert len(tok.merges) > 7000 and all(a + b in vocab for a, b in tok.merges)
    assert tok.token_to_id("the</w>") is not None and tok.token_to_id("LORD</w>") is not None


def test_encode_pair_template_and_decode(kjv_bpe):
    enc = kjv_bpe.encode("In the beginning God created", "the heaven and the earth.")
    assert enc.tokens[0] == "<s>" and enc.tokens[-1] == "</s>"
    assert enc.tokens.count("</s>") == 2
    sep = enc.tokens.index("</s>")
    assert enc.type_ids == [0] * (sep + 1) + [1] * (len(enc) - sep - 1)
    assert enc.special_tokens_mask == [1] + [0] * (sep - 1) + [1] + [0] * (len(enc) - sep - 2) + [1]
    assert kjv_bpe.decode(enc.ids) == "In the beginning God created the heaven and the earth ."
    text = "In the beginning God created"
    first = kjv_bpe.encode(text)
    assert [text[s:e] for s, e in first.offsets[1:-1]] == text.split()


def test_unknown_characters(kjv_bpe):
    enc = kjv_bpe.encode("God ☃ said", add_special_tokens=False)
    assert enc.tokens == ["God</w>", "<unk>", "said</w>"]
    assert enc.offsets == [(0, 3), (4, 5), (6, 10)]


def test_backends_agree(kjv_bpe, kjv):
    python = BPETokenizer(kjv_bpe.get_vocab(), kjv_bpe.merges, backend="python")
    texts = kjv[5::97] + ["Ünïcödé ☃ 中文 tabs\tand\nnewlines", ""]
    assert [encoding_fields(e) for e in python.encode_batch(texts)] == [
        encoding_fields(e) for e in kjv_bpe.encode_batch(texts)
    ]


def test_save_load_identical_ids(kjv_bpe, kjv, tmp_path, backend):
    kjv_bpe.save(tmp_path)
    texts = kjv[1::41]
    expected = kjv_bpe.encode_ids(texts)
    assert BPETokenizer.load(tmp_path, backend).encode_ids(texts) == expected
    assert isinstance(load_tokenizer(tmp_path), BPETokenizer)
    (tmp_path / "tokenizer.json").unlink()
    native = load_tokenizer(tmp_path, backend)
    assert isinstance(native, BPETokenizer) and native.encode_ids(texts) == expected


def test_huggingface_loads_and_encodes_identically(kjv_bpe, kjv, tmp_path, mixed_corpus):
    tk = require("tokenizers")
    kjv_bpe.save(tmp_path)
    hf = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = kjv[3::61] + mixed_corpus[:300]
    ours = kjv_bpe.encode_batch(texts)
    theirs = hf.encode_batch(texts)
    assert [encoding_fields(e) for e in ours] == [encoding_fields(e) for e in theirs]
    assert kjv_bpe.decode_batch([e.ids for e in ours]) == hf.decode_batch([e.ids for e in theirs])


def test_training_from_files_streams_and_shows_progress(kjv, tmp_path, backend, capsys):
    corpus = kjv[:3000]
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("\n".join(corpus[:1500]) + "\n", encoding="utf-8")
    files[1].write_text("\n".join(corpus[1500:]) + "\n", encoding="utf-8")
    from_files = BPETokenizer(backend=backend).train(files, 1500, show_progress=True)
    assert "merges" in capsys.readouterr().err  # the tqdm bar
    from_texts = BPETokenizer(backend=backend).train(
        (line + "\n" for line in corpus), 1500, show_progress=False
    )
    assert from_files.get_vocab() == from_texts.get_vocab()
    assert from_files.merges == from_texts.merges


def test_lowercase_option(kjv):
    tok = BPETokenizer(lowercase=True).train(kjv[:2000], 800, show_progress=False)
    assert tok.encode("GOD", add_special_tokens=False).ids == tok.encode("god", add_special_tokens=False).ids


def test_trained_python_and_core_are_identical(kjv):
    require_core()
    corpus = kjv[::20]
    core = BPETokenizer(backend="core").train(corpus, 1200, show_progress=False)
    python = BPETokenizer(backend="python").train(corpus, 1200, show_progress=False)
    assert core.get_vocab() == python.get_vocab() and core.merges == python.merges


def test_reads_huggingface_char_bpe_tokenizer_json(kjv, tmp_path, backend, mixed_corpus):
    tk = require("tokenizers")
    hf = tk.CharBPETokenizer()  # BertNormalizer + BertPreTokenizer + BPE with "</w>" + BPEDecoder
    hf.train_from_iterator(kjv[::10], vocab_size=2000, min_frequency=2, show_progress=False)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path, backend)
    assert isinstance(ours, BPETokenizer) and ours.vocab_size == hf.get_vocab_size()
    texts = kjv[7::83] + mixed_corpus[:200]
    theirs = hf.encode_batch(texts)
    mine = ours.encode_batch(texts)
    assert [encoding_fields(e) for e in mine] == [encoding_fields(e) for e in theirs]
    assert ours.decode_batch([e.ids for e in mine]) == hf.decode_batch([e.ids for e in theirs])
