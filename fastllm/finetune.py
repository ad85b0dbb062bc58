"""Fine-tuning BERT on GLUE, BIO NER (CoNLL files) and extractive QA (SQuAD JSON):
`python -m fastllm.finetune --task sst2 --data-dir GLUE --model DIR` or `--tasks all`.

Invariants:
- `--model` is a fastllm pre-training checkpoint (manifest.json + model.safetensors, loaded with
  fastllm.train.checkpoint.load_pretrained, imported lazily) or a HuggingFace BERT directory (config.json +
  weights + vocab.txt/tokenizer.json, loaded with fastllm.models.hf.from_hf). The encoder weights always come from
  it; a task head is kept when the checkpoint has one of the right size, freshly initialized when it has none,
  and a head of another size is an error naming both sizes.
- The recipe: AdamW (no weight decay on biases and LayerNorm weights, i.e. on every tensor with < 2 dims), linear
  warm-up then linear decay to 0, gradient clipping at 1.0, evaluation after every epoch. The best epoch (by the
  task score) is written to <output>/<task>/seed-<s>/best as config.json + model.safetensors + tokenizer files,
  atomically (written to a temporary folder, then renamed), and its weights are used for test predictions.
- Everything random (init of a new head, dropout, shuffling) derives from the seed; results of several seeds are
  reported as mean ± sample standard deviation. results.json holds every epoch of every seed.
- Nothing is read from the network unless --hub is given (HF `datasets`, lazily imported).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastllm.eval import glue
from fastllm.eval import metrics as M
from fastllm.eval import tasks as T
from fastllm.models import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

log = logging.getLogger("fastllm")

HEADS = {"seq": BertForSequenceClassification, "token": BertForTokenClassification, "qa": BertForQuestionAnswering}
HEAD_WEIGHT = {"seq": "classifier.weight", "token": "classifier.weight", "qa": "qa_outputs.weight"}


@dataclass
class FinetuneConfig:
    model: str
    task: str = "sst2"  # a GLUE task, "ner" or "qa"
    data_dir: str | None = None  # GLUE data directory (root or task folder)
    train_file: str | None = None  # NER / QA files
    dev_file: str | None = None
    output_dir: str = "finetune_out"
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    doc_stride: int = 128  # QA: context tokens shared by consecutive windows of a long context (HF run_qa)
    max_steps: int | None = None  # stop early (smoke runs)
    train_limit: int | None = None  # use only the first N training examples
    seeds: tuple[int, ...] = (42,)
    predict: bool = False  # write leaderboard files for the GLUE test splits
    hub: bool = False  # load GLUE from the HF hub instead of data_dir
    device: str = "auto"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("epochs and batch_size must be >= 1, lr > 0, warmup_ratio in [0, 1)")
        if not self.seeds:
            raise ValueError("at least one seed is needed")


# ------------------------------------------------------------------------------------------------------ models
def _is_fastllm_checkpoint(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "model.safetensors").is_file()


def _check_head(arch: str | None, have: int | None, head: str, num_labels: int, path) -> bool:
    """True when the checkpoint already holds a head for this task; ValueError when its size differs."""
    if arch is None or HEADS.get(head).__name__ != arch:
        return False
    want = 2 if head == "qa" else num_labels
    if have is not None and have != want:
        raise ValueError(f"{path}: the checkpoint's {arch} head has {have} outputs but the task needs {want}")
    return True


def _fit_state(model, mapped: dict, keep_head: bool, where) -> None:
    """Loads the checkpoint's encoder (and head when keep_head) into model; weights the model does not have
    (MLM/NSP heads, a pooler for token/QA heads) are dropped with a warning, as transformers does."""
    own = model.state_dict()
    head = tuple(k for k in HEAD_WEIGHT.values())
    head_prefixes = tuple(h.split(".")[0] + "." for h in head)
    extra = sorted(k for k in mapped if k not in own or (not keep_head and k.startswith(head_prefixes)))
    mapped = {k: v for k, v in mapped.items() if k not in extra}
    missing = sorted(set(own) - set(mapped))
    fresh_ok = head_prefixes + ("bert.pooler.",)
    if any(not k.startswith(fresh_ok) for k in missing) or (keep_head and any(k.startswith(head_prefixes)
                                                                               for k in missing)):
        raise ValueError(f"{where}: the checkpoint lacks encoder weights of {type(model).__name__}: {missing}")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: weight {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
    if extra:
        log.warning("fastllm: %s: not used by %s: %s", where, type(model).__name__, extra)
    if missing:
        log.warning("fastllm: %s: freshly initialized: %s", where, missing)
    model.load_state_dict({**own, **mapped}, strict=True)


def _load_hf(path: Path, head: str, num_labels: int):
    from fastllm.models.hf import map_hf_keys, bert_config_from_hf, read_config, read_weights
    from fastllm.tokenizers import load_tokenizer
    d = read_config(path)
    if d.get("model_type", "bert") != "bert":
        raise ValueError(f"{path}: model_type {d.get('model_type')!r} is not BERT")
    arch = (d.get("architectures") or [None])[0]
    have = len(d["id2label"]) if "id2label" in d else d.get("num_labels")
    keep = _check_head(arch, have, head, num_labels, path)
    model = HEADS[head](bert_config_from_hf(d, num_labels=max(num_labels, 1)))
    mapped, unknown = map_hf_keys(read_weights(path), "bert", "bert.")
    if unknown:
        log.warning("fastllm: %s: checkpoint weights with no fastllm name, ignored: %s", path, unknown)
    _fit_state(model, mapped, keep, path)
    return model, load_tokenizer(path)


def _load_fastllm(path: Path, head: str, num_labels: int):
    from fastllm.train.checkpoint import load_pretrained  # lazy: the trainer is optional here
    base, tokenizer, cfg = load_pretrained(path)
    if not isinstance(cfg, BertConfig):
        raise TypeError(f"{path}: a {type(cfg).__name__} checkpoint cannot be fine-tuned as BERT")
    body = base if isinstance(base, BertModel) else getattr(base, "bert", None)
    if body is None:
        raise ValueError(f"{path}: {type(base).__name__} has no BERT encoder")
    model = HEADS[head](dataclasses.replace(cfg, num_labels=max(num_labels, 1)))
    state = {k: v for k, v in body.state_dict().items() if not k.startswith("pooler.")}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"{path}: encoder weights do not match: missing {missing}, unexpected {unexpected}")
    if missing:
        log.warning("fastllm: %s: pooler is freshly initialized", path)
    return model, tokenizer


def load_model(path, head: str, num_labels: int):
    """(model with the task head, tokenizer) from a fastllm checkpoint or a HF BERT directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if _is_fastllm_checkpoint(path) or any(path.glob("step-*/manifest.json")):
        return _load_fastllm(path, head, num_labels)
    return _load_hf(path, head, num_labels)


def save_best(model, tokenizer, dest: Path) -> None:
    """Writes config.json + model.safetensors (HF layout) + tokenizer into dest atomically."""
    from fastllm.models.hf import to_hf
    tmp, old = dest.with_name(f".tmp-{dest.name}-{os.getpid()}"), dest.with_name(f".old-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    to_hf(model, tmp)
    tokenizer.save(tmp)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- batches
def _pad(rows: list[list], value) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])


def collate(feats: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads a list of features into model inputs (dynamic padding to the longest)."""
    ids = [f["input_ids"] for f in feats]
    out = {"input_ids": _pad(ids, pad_id), "attention_mask": _pad([[1] * len(x) for x in ids], 0)}
    out["token_type_ids"] = _pad([f.get("token_type_ids", [0] * len(f["input_ids"])) for f in feats], 0)
    if "labels" in feats[0] and isinstance(feats[0]["labels"], list):
        out["labels"] = _pad([f["labels"] for f in feats], T.IGNORE)
    elif feats[0].get("labels") is not None:
        out["labels"] = torch.tensor([f["labels"] for f in feats])
    for k in ("start_positions", "end_positions"):
        if k in feats[0]:
            out[k] = torch.tensor([f[k] for f in feats])
    return out


def glue_features(tokenizer, examples: list[glue.Example], max_length: int) -> list[dict]:
    items = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in examples]
    encs = tokenizer.encode_batch(items, max_length=max_length, truncation=True)
    return [{"input_ids": enc.ids, "token_type_ids": enc.type_ids, "labels": ex.label}
            for enc, ex in zip(encs, examples)]


@torch.no_grad()
def forward_all(model, feats: list[dict], batch_size: int, pad_id: int, device) -> list:
    """Model outputs per feature (logits rows, or (start, end) rows for QA), in order, in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(feats), batch_size):
        b = collate(feats[i:i + batch_size], pad_id)
        b = {k: v.to(device) for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        o = model(**b)
        if hasattr(o, "start_logits"):
            out += list(zip(o.start_logits.float().cpu(), o.end_logits.float().cpu()))
        else:
            out += list(o.logits.float().cpu())
    return out


# --------------------------------------------------------------------------------------------- task set-ups
@dataclass
class TaskSetup:
    """What the loop needs from a task: head, label count, training features and an evaluation function
    returning ({split: metrics}, score in percent)."""
    name: str
    head: str
    num_labels: int
    make: Callable  # tokenizer -> (train_feats, evaluate(model, device) -> (results, score), predict or None)


def _glue_examples(cfg: FinetuneConfig, task: glue.GlueTask, split: str) -> list[glue.Example]:
    if cfg.hub:
        return glue.load_hub(task, split)
    if cfg.data_dir is None:
        raise ValueError("--data-dir (the GLUE data directory) is required unless --hub is given")
    return glue.load_tsv(cfg.data_dir, task, split)


def _glue_predictions(task: glue.GlueTask, rows: list) -> np.ndarray:
    logits = torch.stack(rows)
    return logits[:, 0].numpy() if task.is_regression else logits.argmax(-1).numpy()


def glue_setup(cfg: FinetuneConfig, task: glue.GlueTask) -> TaskSetup:
    def make(tokenizer, pad_id):
        train = _glue_examples(cfg, task, "train")[:cfg.train_limit]
        devs = {s: _glue_examples(cfg, task, s) for s in task.dev_splits}
        dev_feats = {s: glue_features(tokenizer, ex, cfg.max_length) for s, ex in devs.items()}

        def evaluate(model, device):
            res = {}
            for s, ex in devs.items():
                preds = _glue_predictions(task, forward_all(model, dev_feats[s], cfg.eval_batch_size, pad_id, device))
                res[s] = glue.compute_metrics(task, preds, [e.label for e in ex])
            return res, float(np.mean([glue.task_score(r) for r in res.values()]))

        def predict(model, device, out_dir):
            for s in task.test_splits:
                ex = _glue_examples(cfg, task, s)
                rows = forward_all(model, glue_features(tokenizer, ex, cfg.max_length), cfg.eval_batch_size,
                                   pad_id, device)
                glue.write_submission(out_dir, task, s, [e.guid for e in ex], _glue_predictions(task, rows))
        return glue_features(tokenizer, train, cfg.max_length), evaluate, predict
    return TaskSetup(task.name, "seq", task.num_labels, make)


def _files(cfg: FinetuneConfig) -> tuple[str, str]:
    if not cfg.train_file or not cfg.dev_file:
        raise ValueError(f"task {cfg.task!r} needs --train-file and --dev-file")
    return cfg.train_file, cfg.dev_file


def ner_setup(cfg: FinetuneConfig) -> TaskSetup:
    train_path, dev_path = _files(cfg)
    train, dev = T.read_conll(train_path)[:cfg.train_limit], T.read_conll(dev_path)
    labels = T.tag_list(train)

    def make(tokenizer, pad_id):
        dev_feats = T.ner_features(tokenizer, dev, labels, cfg.max_length, dev_path)

        def evaluate(model, device):
            rows = forward_all(model, dev_feats, cfg.eval_batch_size, pad_id, device)
            pred = [T.decode_tags(r, f, labels) for r, f in zip(rows, dev_feats)]
            res = M.entity_scores([s.tags for s in dev], pred)
            return {"dev": res}, 100.0 * res["f1"]
        return T.ner_features(tokenizer, train, labels, cfg.max_length, train_path), evaluate, None
    return TaskSetup("ner", "token", len(labels), make)


def qa_setup(cfg: FinetuneConfig) -> TaskSetup:
    train_path, dev_path = _files(cfg)
    train, dev = T.read_squad(train_path)[:cfg.train_limit], T.read_squad(dev_path)
    allow_empty = any(not e.answers for e in train + dev)

    def make(tokenizer, pad_id):
        dev_feats = T.qa_features(tokenizer, dev, cfg.max_length, cfg.doc_stride)

        def evaluate(model, device):
            rows = forward_all(model, dev_feats, cfg.eval_batch_size, pad_id, device)
            windows: list[list[int]] = [[] for _ in dev]
            for i, f in enumerate(dev_feats):
                windows[f["example"]].append(i)
            pred = [T.decode_example([rows[i] for i in w], [dev_feats[i] for i in w], ex.context,
                                     allow_empty=allow_empty) for w, ex in zip(windows, dev)]
            res = M.squad_metrics(pred, [ex.answers for ex in dev])
            return {"dev": res}, res["f1"]
        return T.qa_features(tokenizer, train, cfg.max_length, cfg.doc_stride), evaluate, None
    return TaskSetup("qa", "qa", 2, make)


def make_setup(cfg: FinetuneConfig) -> TaskSetup:
    if cfg.task == "ner":
        return ner_setup(cfg)
    if cfg.task == "qa":
        return qa_setup(cfg)
    return glue_setup(cfg, glue.get_task(cfg.task))


# -------------------------------------------------------------------------------------------------- training
def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on tensors of < 2 dims (biases, LayerNorm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def linear_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps to the base lr, then linear decay to 0 at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _train_epoch(model, feats, cfg, opt, sched, gen, pad_id, device, step: int, total: int) -> tuple[int, float]:
    model.train()
    order = torch.randperm(len(feats), generator=gen).tolist()
    losses = []
    for i in range(0, len(order), cfg.batch_size):
        if step >= total:
            break
        batch = {k: v.to(device) for k, v in collate([feats[j] for j in order[i:i + cfg.batch_size]],
                                                      pad_id).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step += 1
    return step, float(np.mean(losses)) if losses else float("nan")


def run_seed(cfg: FinetuneConfig, setup: TaskSetup, seed: int) -> dict:
    """Fine-tunes one seed; returns {"seed", "best_epoch", "best_score", "results", "history"}."""
    torch.manual_seed(seed)
    device = _device(cfg.device)
    model, tokenizer = load_model(cfg.model, setup.head, setup.num_labels)
    model.to(device)
    pad_id = tokenizer.token_to_id(tokenizer.pad_token or "[PAD]") or 0
    train, evaluate, predict = setup.make(tokenizer, pad_id)
    if not train:
        raise ValueError(f"task {setup.name}: no training examples")
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = min(per_epoch * cfg.epochs, cfg.max_steps or per_epoch * cfg.epochs)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = linear_schedule(opt, int(cfg.warmup_ratio * total), total)
    gen = torch.Generator().manual_seed(seed)
    out_dir = Path(cfg.output_dir) / setup.name / f"seed-{seed}"
    best = {"seed": seed, "best_epoch": 0, "best_score": -math.inf, "results": None, "history": []}
    best_state, step = None, 0
    for epoch in range(1, cfg.epochs + 1):
        step, loss = _train_epoch(model, train, cfg, opt, sched, gen, pad_id, device, step, total)
        results, score = evaluate(model, device)
        best["history"].append({"epoch": epoch, "step": step, "train_loss": loss, "results": results,
                                "score": score})
        log.info("fastllm: %s seed %d epoch %d loss %.4f score %.2f", setup.name, seed, epoch, loss, score)
        if score > best["best_score"] or best_state is None:
            best.update(best_epoch=epoch, best_score=score, results=results)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_best(model, tokenizer, out_dir / "best")
        if step >= total:
            break
    if predict is not None and cfg.predict:
        model.load_state_dict(best_state)
        predict(model, device, Path(cfg.output_dir) / "submission")
    return best


# -------------------------------------------------------------------------------------------------- reporting
def _flat_metrics(results: dict) -> dict[str, float]:
    return {(m if len(results) == 1 else f"{s}/{m}"): v for s, res in results.items() for m, v in res.items()}


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std"}} over seeds (std is the sample std, 0 for one seed); "score" included."""
    flat = [{**_flat_metrics(r["results"]), "score": r["best_score"]} for r in runs]
    out = {}
    for k in flat[0]:
        vals = np.array([f[k] for f in flat], dtype=np.float64)
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out


def _fmt(stat: dict[str, float], scale: float = 1.0) -> str:
    return f"{stat['mean'] * scale:.2f} ± {stat['std'] * scale:.2f}"


def format_table(summaries: dict[str, dict]) -> str:
    lines = [f"{'task':<8} {'metric':<28} {'mean ± std':>16}"]
    for task, summ in summaries.items():
        for metric, stat in summ.items():
            scale = 1.0 if metric == "score" or task == "qa" else 100.0
            lines.append(f"{task:<8} {metric:<28} {_fmt(stat, scale):>16}")
    return "\n".join(lines)


def glue_means(per_task: dict[str, list[dict]]) -> dict[str, float]:
    """{leaderboard column: score in percent, mean over seeds} for the GLUE tasks run (MNLI gives m and mm)."""
    means = {}
    for t, runs in per_task.items():
        by_col = [glue.leaderboard_entries({t: r["results"]}) for r in runs]
        for col in by_col[0]:
            means[col] = float(np.mean([b[col] for b in by_col]))
    return means


def format_glue_table(means: dict[str, float]) -> str:
    """The leaderboard row (percent) with the GLUE average of the columns present."""
    cols = [*means, "Average"]
    vals = [*means.values(), float(np.mean(list(means.values())))]
    return " | ".join(f"{c:>8}" for c in cols) + "\n" + " | ".join(f"{v:8.2f}" for v in vals)


def run_task(cfg: FinetuneConfig) -> tuple[list[dict], dict]:
    setup = make_setup(cfg)
    runs = [run_seed(cfg, setup, s) for s in cfg.seeds]
    return runs, summarize(runs)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def run(cfg: FinetuneConfig, task_names: list[str]) -> dict:
    """Runs the tasks, prints the results table (and the GLUE table for GLUE tasks), writes results.json."""
    all_runs, summaries = {}, {}
    for name in task_names:
        all_runs[name], summaries[name] = run_task(dataclasses.replace(cfg, task=name))
    print(format_table(summaries))
    report = {"config": dataclasses.asdict(cfg), "summary": summaries, "runs": all_runs}
    glue_runs = {t: r for t, r in all_runs.items() if t in glue.TASKS}
    if glue_runs:
        means = glue_means(glue_runs)
        print(format_glue_table(means))
        report["glue"] = {"scores": means, "average": float(np.mean(list(means.values())))}
    _write_json(Path(cfg.output_dir) / "results.json", report)
    return report


def parse_args(argv: list[str] | None = None) -> tuple[FinetuneConfig, list[str]]:
    p = argparse.ArgumentParser(prog="python -m fastllm.finetune", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="fastllm checkpoint or HuggingFace BERT directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), ner or qa")
    g.add_argument("--tasks", help="comma-separated tasks, or 'all' for the nine GLUE tasks")
    p.add_argument("--data-dir")
    p.add_argument("--train-file")
    p.add_argument("--dev-file")
    p.add_argument("--output-dir", default="finetune_out")
    for name, typ in (("epochs", int), ("batch-size", int), ("eval-batch-size", int), ("lr", float),
                      ("weight-decay", float), ("warmup-ratio", float), ("max-length", int), ("doc-stride", int),
                      ("max-steps", int),
                      ("train-limit", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--predict", action="store_true", help="write GLUE leaderboard files for the test splits")
    p.add_argument("--hub", action="store_true", help="load GLUE from the HuggingFace hub (online)")
    p.add_argument("--device")
    a = p.parse_args(argv)
    names = list(glue.TASKS) if a.tasks == "all" else (a.tasks.split(",") if a.tasks else [a.task])
    for n in names:
        if n not in ("ner", "qa"):
            glue.get_task(n)  # unknown names fail before any training
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    given = {k: v for k, v in vars(a).items() if k in fields and v is not None and v is not False}
    if "seeds" in given:
        given["seeds"] = tuple(given["seeds"])
    return FinetuneConfig(**{**given, "predict": a.predict, "hub": a.hub}), names


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, names = parse_args(argv)
    run(cfg, [glue.get_task(n).name if n not in ("ner", "qa") else n for n in names])
    return 0


if __name__ == "__main__":
    sys.exit(main())
