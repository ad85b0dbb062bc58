"""Model analysis: `python -m fastllm.analyze --model.preset bert-base [--seq-len 128] [--attention-png a.png]`.

Reports parameter counts per module, FLOPs per token (forward, and a training step = forward + 2x backward),
a memory estimate, a measured inference time, and saves attention maps of one input as a heatmap PNG.

Invariants:
- FLOPs are analytic: 2 x (Linear weight elements) per token for every Linear a token passes through, plus
  attention 4 x T_keys x H per token per attention layer (q k^T and p v; causal layers average (T + 1) / 2
  keys). The BERT MLM head in training runs on the masked fraction only (--mask-fraction, default 0.15) and is
  counted that way; inference counts it on every token (full prediction logits). In training BERT's last layer
  also runs on the loss rows only (the masked tokens and [CLS]: a fraction mask_fraction + 1/T of the tokens),
  except for its key and value projections, which see every token; that is counted too. Embedding lookups, LayerNorm,
  softmax and activations (O(H) per token) are left out and said so.
- Memory: fp32 weights + grads + Adam moments (4 + 4 + 8 bytes per parameter) and activations estimated by
  Korthikanti et al. 2022 (34 T B H bytes per layer at 16 bits; x2 for fp32) without the 5 a T^2 B term, which
  the fused attention never stores.
- matplotlib is imported only when a PNG is written.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from fastllm.models import GPT, BertForPreTraining, Transformer, preset
from fastllm.models.bert import _BertWithHead


@dataclass
class Flops:
    forward: float  # per token, inference (full output logits)
    train: float  # per token, forward + backward of a training step


def parameter_table(model: nn.Module, depth: int = 2) -> list[tuple[str, int]]:
    """(module path, parameters) for modules up to `depth` levels deep; shared modules and tied weights
    (the MLM decoder and the GPT LM head reuse the word embeddings) are counted once, where they live."""
    rows = [(name, sum(p.numel() for p in mod.parameters())) for name, mod in model.named_modules()
            if name and name.count(".") < depth]
    return [*rows, ("total", sum(p.numel() for p in model.parameters()))]


def _linear_flops(module: nn.Module) -> float:
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


def _attention_flops(hidden: int, keys: float) -> float:
    return 4.0 * keys * hidden  # q k^T and p v, per query token


def _last_layer_saving(model: _BertWithHead, seq: int, mask_fraction: float) -> float:
    """FLOPs per token that training skips by running the last layer on the loss rows only (BERT's query_rows)."""
    layers = model.bert.layers
    if not hasattr(model, "mlm") or not len(layers) or not layers[-1].accepts_query_rows():
        return 0.0
    last, attn, hidden = layers[-1], layers[-1].attn, model.config.hidden_size
    kv = 2.0 * hidden * (attn.qkv.out_features - attn.heads * attn.head_dim)  # k, v projections: every token
    rows = _linear_flops(last) - kv + _attention_flops(hidden, seq)  # q, out, MLP, attention: loss rows only
    return (1.0 - min(1.0, mask_fraction + 1.0 / seq)) * rows


def bert_flops(model: _BertWithHead, seq: int, mask_fraction: float) -> Flops:
    c = model.config
    body = _linear_flops(model.bert.layers) + c.num_hidden_layers * _attention_flops(c.hidden_size, seq)
    pooler = _linear_flops(model.bert.pooler) / seq if model.bert.pooler is not None else 0.0
    head = 0.0
    if hasattr(model, "mlm"):
        head = _linear_flops(model.mlm.transform) + 2.0 * c.hidden_size * c.vocab_size
    fwd = body + pooler + head
    train_fwd = body - _last_layer_saving(model, seq, mask_fraction) + pooler + head * mask_fraction
    return Flops(fwd, 3.0 * train_fwd)


def gpt_flops(model: GPT, seq: int) -> Flops:
    c = model.config
    keys = (seq + 1) / 2  # causal: query t sees t + 1 keys
    fwd = _linear_flops(model.layers) + c.n_layer * _attention_flops(c.n_embd, keys) + 2.0 * c.n_embd * c.vocab_size
    return Flops(fwd, 3.0 * fwd)


def transformer_flops(model: Transformer, seq: int) -> Flops:
    c = model.config
    enc = _linear_flops(model.encoder) + c.num_encoder_layers * _attention_flops(c.d_model, seq)
    dec = _linear_flops(model.decoder) + c.num_decoder_layers * (
        _attention_flops(c.d_model, (seq + 1) / 2) + _attention_flops(c.d_model, seq))
    fwd = enc + dec + 2.0 * c.d_model * c.tgt_vocab_size  # per (source token + target token) pair
    return Flops(fwd, 3.0 * fwd)


def flops(model, seq: int, mask_fraction: float) -> Flops:
    if isinstance(model, GPT):
        return gpt_flops(model, seq)
    if isinstance(model, Transformer):
        return transformer_flops(model, seq)
    return bert_flops(model, seq, mask_fraction)


def memory_estimate(model, batch: int, seq: int) -> dict[str, float]:
    """Bytes of a fp32 Adam training step."""
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or cfg.d_model
    layers = (getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
              or cfg.num_encoder_layers + cfg.num_decoder_layers)
    act = 2 * 34 * seq * batch * hidden * layers  # fp32: twice the 16-bit figure
    return {"weights": 4.0 * n, "grads": 4.0 * n, "adam": 8.0 * n, "activations": float(act)}


def example_inputs(model, batch: int, seq: int, ids: list[int] | None = None) -> dict:
    vocab = model.config.src_vocab_size if isinstance(model, Transformer) else model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([ids]) if ids else torch.randint(0, vocab, (batch, seq), generator=g)  # (B, T)
    if isinstance(model, Transformer):
        return {"input_ids": x, "decoder_input_ids": x.clamp(max=model.config.tgt_vocab_size - 1)}
    return {"input_ids": x}


@torch.no_grad()
def time_forward(model, inputs: dict, repeats: int = 3) -> float:
    """Median seconds of an inference forward (eval mode, no grad) after one warm-up."""
    model.eval()
    model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def attention_maps(model, inputs: dict) -> tuple[torch.Tensor, ...]:
    """One (B, heads, T, T) probability tensor per (encoder / decoder self-attention) layer."""
    model.eval()
    if isinstance(model, Transformer):
        memory = model.encode(inputs["input_ids"])
        return tuple(layer(memory, output_attentions=True).attentions for layer in model.encoder)
    if isinstance(model, GPT):
        return model(inputs["input_ids"], output_attentions=True).attentions
    return model.bert(inputs["input_ids"], output_attentions=True).attentions


def save_heatmaps(maps: tuple[torch.Tensor, ...], layer: int, path: str) -> str:
    """Writes every head of `layer` (first batch row) as a grid of heatmaps."""
    import matplotlib  # lazy: optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = maps[layer][0]  # (heads, T, T)
    cols = min(4, probs.shape[0])
    rows = -(-probs.shape[0] // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        ax.axis("off")
        if h < probs.shape[0]:
            ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0.0)
            ax.set_title(f"layer {layer} head {h}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build(name: str, kernels: str):
    cfg = preset(name, kernels=kernels)
    if name.startswith("bert"):
        return BertForPreTraining(cfg)
    return GPT(cfg) if name.startswith("gpt") else Transformer(cfg)


def report(args) -> str:
    torch.set_num_threads(args.threads)
    if args.ids:
        args.batch, args.seq_len = 1, len(args.ids)
    torch.manual_seed(0)
    model = build(args.preset, args.kernels)
    lines = [(f"model {args.preset} ({type(model).__name__}), seq {args.seq_len}, batch {args.batch}, "
             f"threads {args.threads}"), "", f"{'module':<40} {'parameters':>14}"]
    lines += [f"{n:<40} {c:>14,}" for n, c in parameter_table(model, args.depth)]
    f = flops(model, args.seq_len, args.mask_fraction)
    lines += ["", (f"FLOPs per token: forward {f.forward / 1e6:,.1f} M, training step {f.train / 1e6:,.1f} M "
              "(matmuls + attention; LayerNorm/softmax/activations excluded)")]
    mem = memory_estimate(model, args.batch, args.seq_len)
    lines += ["memory estimate (fp32 Adam step): " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in mem.items())
              + f", total {sum(mem.values()) / 2**20:,.1f} MiB"]
    inputs = example_inputs(model, args.batch, args.seq_len, args.ids)
    if args.repeats > 0:
        sec = time_forward(model, inputs, args.repeats)
        tokens = inputs["input_ids"].numel()
        lines.append(f"inference forward: {sec * 1e3:,.1f} ms median of {args.repeats} ({tokens / sec:,.0f} tokens/s)")
    if args.attention_png:
        path = save_heatmaps(attention_maps(model, inputs), args.layer, args.attention_png)
        lines.append(f"attention maps of layer {args.layer} saved to {path}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastllm.analyze", description=__doc__.split("\n")[0])
    p.add_argument("--model.preset", "--preset", dest="preset", default="bert-base")
    p.add_argument("--model.kernels", "--kernels", dest="kernels", default="auto")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mask-fraction", type=float, default=0.15)
    p.add_argument("--depth", type=int, default=2, help="module nesting depth of the parameter table")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards (0 skips timing)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ids", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated token ids of the input (default: random)")
    p.add_argument("--attention-png", default=None, help="write the attention maps of --layer to this PNG")
    p.add_argument("--layer", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    print(report(parse_args(argv)))


if __name__ == "__main__":
    main()
