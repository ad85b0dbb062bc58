"""Tiny BERT checkpoints and learnable fixture data for the fine-tuning tests."""
import random
from pathlib import Path

from fastllm.models import BertConfig, BertModel
from fastllm.models.hf import to_hf
from fastllm.tokenizers import WordPieceTokenizer

POS, NEG = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "was", "it", "is", "a", "film", "plot", "and", "acting", "story", "this"]
NAMES, PLACES = ["john", "mary", "alice", "bob"], ["paris", "london", "rome", "berlin"]
WORDS = POS + NEG + FILLER + NAMES + PLACES + ["new", "york", "lives", "in", "met", "what", "color", "red", "blue",
                                               "green", "animal", "cat", "dog", "fox", ".", "?"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_config(**kw) -> BertConfig:
    base = {"vocab_size": len(SPECIAL) + len(WORDS), "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return BertConfig(**{**base, **kw})


def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer(vocab={t: i for i, t in enumerate(SPECIAL + WORDS)})


def tiny_hf_dir(path: Path) -> Path:
    """A HF-format BERT directory (BertModel weights + vocab.txt) with random weights."""
    to_hf(BertModel(tiny_config()), path)
    (path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return path


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randint(3, 7))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
        rows.append((" ".join(words) + " ", label))
    return rows


def write_sst2(root: Path, n_train: int = 160, n_dev: int = 48) -> Path:
    """A learnable task in the official SST-2 layout (`sentence<TAB>label` with a header)."""
    d = root / "SST-2"
    d.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in sentiment_rows(n, seed)]
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (d / "test.tsv").write_text("index\tsentence\n0\tthe film was great \n1\tit is awful \n")
    return root


def ner_sentence(rng: random.Random) -> list[tuple[str, str]]:
    out = [(w, "O") for w in rng.choices(FILLER, k=rng.randint(1, 3))]
    out.append((rng.choice(NAMES), "B-PER"))
    out += [("lives", "O"), ("in", "O")]
    out += [("new", "B-LOC"), ("york", "I-LOC")] if rng.random() < 0.3 else [(rng.choice(PLACES), "B-LOC")]
    return out + [(".", "O")]


def write_conll(path: Path, n: int, seed: int) -> Path:
    """CoNLL-2003-style columns: token POS chunk NER, blank lines between sentences, a -DOCSTART- line."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""]
    for _ in range(n):
        lines += [f"{w} NN I-NP {t}" for w, t in ner_sentence(rng)] + [""]
    path.write_text("\n".join(lines))
    return path
