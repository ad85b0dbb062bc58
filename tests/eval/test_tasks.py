"""NER (CoNLL columns) and QA (SQuAD JSON): loaders, features that map back to the gold answers, fine-tuning."""
import json
from pathlib import Path

import pytest
import torch

from fastllm import finetune as F
from fastllm.eval import tasks as T
from fastllm.tokenizers import load_tokenizer
from tests.eval import helpers as H
from tests.eval.test_finetune import _minilm_dir

DATA = Path(__file__).parent / "data"


def test_read_conll_2003_columns():
    sents = T.read_conll(DATA / "conll" / "sample.txt")
    assert [len(s.words) for s in sents] == [9, 2, 2]
    assert sents[1].words == ["Peter", "Blackburn"] and sents[1].tags == ["B-PER", "I-PER"]
    assert T.tag_list(sents) == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]


def test_bad_conll_names_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected a token and a tag"):
        T.read_conll(p)
    p.write_text("EU ORG\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: tag 'ORG' is not BIO"):
        T.read_conll(p)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        T.read_conll(tmp_path / "nope.txt")


def test_ner_features_label_first_piece_and_unknown_tags():
    tok = load_tokenizer(_minilm_dir())
    sents = T.read_conll(DATA / "conll" / "sample.txt")
    labels = T.tag_list(sents)
    feats = T.ner_features(tok, sents, labels, 64, "sample")
    f = feats[1]  # Peter Blackburn: Blackburn splits into several pieces
    assert [f["labels"][i] for i in f["word_starts"]] == [labels.index("B-PER"), labels.index("I-PER")]
    assert sum(x != T.IGNORE for x in f["labels"]) == 2 and len(f["labels"]) == len(f["input_ids"])
    short = T.ner_features(tok, sents[:1], labels, 6, "sample")[0]
    logits = torch.zeros(len(short["input_ids"]), len(labels))
    assert len(T.decode_tags(logits, short, labels)) == 9  # truncated words are predicted "O"
    with pytest.raises(ValueError, match="tag 'B-PER' is not in the training label set"):
        T.ner_features(tok, sents[1:2], ["O", "I-PER"], 64, "dev.txt")


def test_squad_reader_and_spans_map_back_to_answers():
    exs = T.read_squad(DATA / "squad" / "sample.json")
    assert [len(e.answers) for e in exs] == [1, 2, 0]
    tok = load_tokenizer(_minilm_dir())
    feats = T.qa_features(tok, exs, 64)
    for ex, f in zip(exs, feats):
        start, end = torch.full((len(f["input_ids"]),), -9.0), torch.full((len(f["input_ids"]),), -9.0)
        start[f["start_positions"]], end[f["end_positions"]] = 9.0, 9.0
        text = T.decode_span(start, end, f, ex.context, allow_empty=True)
        assert text == (ex.answers[0] if ex.answers else "")
    windows = T.qa_features(tok, exs[:1], 16, doc_stride=3)  # a long context: several overlapping windows
    assert len(windows) > 1 and all(w["example"] == 0 for w in windows)
    hits = [w for w in windows if w["start_positions"] > 0]
    assert hits and any(w["start_positions"] == 0 == w["end_positions"] for w in windows)  # others target [CLS]
    rows = []
    for w in windows:  # the model is right in one window only; the null score is low everywhere
        start, end = torch.full((len(w["input_ids"]),), -9.0), torch.full((len(w["input_ids"]),), -9.0)
        if w is hits[0]:
            start[w["start_positions"]], end[w["end_positions"]] = 9.0, 9.0
        rows.append((start, end))
    assert T.decode_example(rows, windows, exs[0].context, allow_empty=True) == exs[0].answers[0]


@pytest.mark.parametrize("max_length,stride", [(28, 4), (40, 10), (64, 0)])
def test_qa_windows_equal_huggingface_overflow(max_length, stride):
    """Our windows are HF tokenizers' overflowing windows (truncation only_second, stride = overlap)."""
    transformers = pytest.importorskip("transformers")
    exs = T.read_squad(DATA / "squad" / "sample.json")
    ours = T.qa_features(load_tokenizer(_minilm_dir()), exs, max_length, doc_stride=stride)
    hf = transformers.AutoTokenizer.from_pretrained(str(_minilm_dir()))
    want = []
    for ex in exs:
        enc = hf(ex.question, ex.context, max_length=max_length, stride=stride, truncation="only_second",
                 return_overflowing_tokens=True)
        want += enc["input_ids"]
    assert [f["input_ids"] for f in ours] == want


def test_bad_squad_names_the_key(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "1", "answers": []}]}]}]}))
    with pytest.raises(ValueError, match=r"s.json: data\[0\].paragraphs\[0\].qas\[0\]: missing key 'question'"):
        T.read_squad(p)
    p.write_text("{}")
    with pytest.raises(ValueError, match="missing key 'data'"):
        T.read_squad(p)


def test_tiny_bert_learns_ner(tmp_path):
    train, dev = H.write_conll(tmp_path / "train.txt", 200, 1), H.write_conll(tmp_path / "dev.txt", 40, 2)
    cfg = F.FinetuneConfig(model=str(H.tiny_hf_dir(tmp_path / "tiny")), task="ner", train_file=str(train),
                           dev_file=str(dev), epochs=4, batch_size=16, lr=3e-3, output_dir=str(tmp_path / "o"))
    report = F.run(cfg, ["ner"])
    assert report["summary"]["ner"]["f1"]["mean"] >= 0.8, report["summary"]


def test_qa_finetune_runs_with_squad_metrics(tmp_path):
    path = DATA / "squad" / "sample.json"
    cfg = F.FinetuneConfig(model=str(H.tiny_hf_dir(tmp_path / "tiny")), task="qa", train_file=str(path),
                           dev_file=str(path), epochs=2, batch_size=2, lr=1e-3, output_dir=str(tmp_path / "o"))
    run = F.run_seed(cfg, F.make_setup(cfg), 0)
    assert set(run["results"]["dev"]) == {"exact_match", "f1"}
    assert 0.0 <= run["results"]["dev"]["f1"] <= 100.0 and len(run["history"]) == 2
