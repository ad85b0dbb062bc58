"""WordPieceTokenizer against HuggingFace's BERT tokenizer (all-MiniLM-L6-v2 uncased vocab); training."""

from __future__ import annotations

import pytest

from fastllm.tokenizers import WordPieceTokenizer, load_tokenizer, read_tokenizer_json
from tests.tokenizers.conftest import encoding_fields, first_mismatch, hf_bert, require


@pytest.fixture
def bert(bert_dir, backend) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_vocab_txt(bert_dir / "vocab.txt", backend=backend)


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_matches_huggingface(bert_dir, backend, corpus, lowercase):
    ours = WordPieceTokenizer.from_vocab_txt(bert_dir / "vocab.txt", lowercase=lowercase, backend=backend)
    hf = hf_bert(bert_dir, lowercase)
    mine, theirs = ours.encode_batch(corpus), hf.encode_batch(corpus)
    assert [encoding_fields(e) for e in mine] == [encoding_fields(e) for e in theirs], first_mismatch(
        mine, theirs, corpus
    )
    assert ours.decode_batch([e.ids for e in mine]) == hf.decode_batch([e.ids for e in theirs])


def test_known_pieces(bert):
    enc = bert.encode("Unaffable tokenization, 中文!")
    # as HuggingFace gives with this vocabulary: pieces of the original word, CJK characters alone
    assert enc.tokens == [
        "[CLS]",
        "una",
        "##ffa",
        "##ble",
        "token",
        "##ization",
        ",",
        "中",
        "文",
        "!",
        "[SEP]",
    ]
    assert enc.offsets == [
        (0, 0),
        (0, 3),
        (3, 6),
        (6, 9),
        (10, 15),
        (15, 22),
        (22, 23),
        (24, 25),
        (25, 26),
        (26, 27),
        (0, 0),
    ]


@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
@pytest.mark.parametrize("max_length", [8, 13, 20, 64])
def test_pairs_truncation_and_padding_match_huggingface(bert_dir, backend, kjv, strategy, max_length):
    ours = WordPieceTokenizer.from_vocab_txt(bert_dir / "vocab.txt", backend=backend)
    hf = hf_bert(bert_dir, True)
    hf.enable_truncation(max_length, strategy=strategy)
    hf.enable_padding(pad_id=0, pad_token="[PAD]", length=max_length)
    pairs = [(kjv[i], kjv[i + 1][: 7 * (i % 9)]) for i in range(0, 400, 7)]
    for a, b in pairs:
        try:
            expected = hf.encode(a, b)
        except Exception as err:  # noqa: BLE001 - HuggingFace refuses: the sequence to truncate is too short
            with pytest.raises(ValueError, match="too short"):
                ours.encode(a, b, max_length=max_length, truncation=strategy, padding="max_length")
            assert "too short" in str(err).lower() or "truncat" in str(err).lower()
            continue
        got = ours.encode(a, b, max_length=max_length, truncation=strategy, padding="max_length")
        assert encoding_fields(got) == encoding_fields(expected), (a, b)


def test_batch_padding_longest_and_no_special_tokens(bert_dir, bert, kjv):
    hf = hf_bert(bert_dir, True)
    hf.enable_padding(pad_id=0, pad_token="[PAD]")
    texts = kjv[:20]
    ours = bert.encode_batch(texts, padding=True)
    assert [encoding_fields(e) for e in ours] == [encoding_fields(e) for e in hf.encode_batch(texts)]
    plain = bert.encode(kjv[0], kjv[1], add_special_tokens=False)
    expected = hf_bert(bert_dir, True).encode(kjv[0], kjv[1], add_special_tokens=False)
    assert encoding_fields(plain) == encoding_fields(expected)


def test_long_words_become_unknown(bert):
    word = "a" * 101
    assert bert.encode(word + " ok").tokens == ["[CLS]", "[UNK]", "ok", "[SEP]"]
    assert bert.encode(word[:100]).tokens[1] != "[UNK]"
    assert bert.encode("\u2603\u2603").tokens == ["[CLS]", "[UNK]", "[SEP]"]  # snowmen: not in the vocab


def test_special_tokens_in_text_only_when_allowed(bert):
    text = "hello [MASK] world"
    assert "[MASK]" not in bert.encode(text).tokens
    enc = bert.encode(text, allowed_special={"[MASK]"})
    assert enc.tokens == ["[CLS]", "hello", "[MASK]", "world", "[SEP]"]
    assert enc.offsets[2] == (6, 12)


def test_reads_and_writes_huggingface_tokenizer_json(bert_dir, tmp_path, backend, corpus):
    tk = require("tokenizers")
    tok = read_tokenizer_json(bert_dir / "tokenizer.json", backend)
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab_size == 30522
    hf = hf_bert(bert_dir, True)
    expected = hf.encode_batch(corpus)
    assert [e.ids for e in tok.encode_batch(corpus)] == [e.ids for e in expected]
    tok.save(tmp_path)
    reloaded = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    got = reloaded.encode_batch(corpus)
    assert [encoding_fields(e) for e in got] == [encoding_fields(e) for e in expected]
    pair = reloaded.encode("first text", "second one")
    assert encoding_fields(tok.encode("first text", "second one")) == encoding_fields(pair)


def test_training_reaches_vocab_size_and_round_trips(kjv, tmp_path, backend):
    step, size = (3, 6000) if backend == "core" else (12, 3000)  # the Python reference is slow
    tok = WordPieceTokenizer(backend=backend).train(kjv[::step], size, min_frequency=2, show_progress=False)
    assert tok.vocab_size == size
    assert tok.special_tokens == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [tok.id_to_token(i) for i in range(5)] == tok.special_tokens
    ids = tok.encode_ids(kjv[1::50])
    assert tok.token_to_id("[UNK]") not in {i for seq in ids for i in seq}  # every KJV character is covered
    tok.save(tmp_path)
    for loaded in (WordPieceTokenizer.load(tmp_path, backend), load_tokenizer(tmp_path, backend)):
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.encode_ids(kjv[1::50]) == ids
    (tmp_path / "tokenizer.json").unlink()
    assert WordPieceTokenizer.load(tmp_path, backend).encode_ids(kjv[1::50]) == ids


def test_training_is_deterministic_and_covers_like_huggingface(kjv):
    tk = require("tokenizers")
    corpus = kjv[::4]
    first = WordPieceTokenizer().train(corpus, 4000, show_progress=False, num_threads=2)
    second = WordPieceTokenizer().train(iter(corpus), 4000, show_progress=False, num_threads=1)
    assert first.get_vocab() == second.get_vocab()
    hf = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = tk.normalizers.BertNormalizer()
    hf.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    hf.train_from_iterator(
        corpus,
        tk.trainers.WordPieceTrainer(
            vocab_size=4000, min_frequency=2, special_tokens=list(first.special_tokens), show_progress=False
        ),
    )
    # HuggingFace's ids (and hence tie-breaks) depend on hash order, so compare sets and length, not ids
    theirs = set(hf.get_vocab())
    assert hf.get_vocab_size() == first.vocab_size == 4000
    assert len(theirs & set(first.get_vocab())) > 0.98 * 4000
