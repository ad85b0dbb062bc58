"""Shared helpers of the model tests: tiny configs, required optional packages, comparison with a reason.

Invariant: a missing test dependency is a failure naming the package to install, never a skip.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from fastllm.models import BertConfig, GPTConfig, TransformerConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def require(module: str, package: str | None = None):
    """Imports `module` or fails the test with the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"this test needs `pip install {package or module}` (the [test] extra): {err}")


def tiny_bert(**kw) -> BertConfig:
    base = {"vocab_size": 101, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
                "max_position_embeddings": 40, "type_vocab_size": 2, "num_labels": 3}
    return BertConfig(**{**base, **kw})


def tiny_gpt(**kw) -> GPTConfig:
    base = {"vocab_size": 97, "n_positions": 48, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0}
    return GPTConfig(**{**base, **kw})


def tiny_transformer(**kw) -> TransformerConfig:
    base = {"src_vocab_size": 61, "tgt_vocab_size": 61, "d_model": 32, "num_encoder_layers": 2, "num_decoder_layers": 2,
                "num_heads": 4, "d_ff": 48, "max_position_embeddings": 48}
    return TransformerConfig(**{**base, **kw})


def mlm_batch(cfg: BertConfig, b: int = 3, t: int = 13, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (b, t), generator=g)  # (B, T)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 4:] = 0  # one padded row
    types = torch.randint(0, cfg.type_vocab_size, (b, t), generator=g)
    labels = torch.full((b, t), -100)
    pick = torch.rand(b, t, generator=g) < 0.3
    pick[:, 2] = True  # at least one masked token per row
    labels[pick] = ids[pick]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
                "next_sentence_label": torch.randint(0, 2, (b,), generator=g)}


def overfit(model, batch: dict, steps: int = 30, lr: float = 3e-3) -> tuple[float, float]:
    """(first loss, last loss) of `steps` Adam steps on one batch with dropout off."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]
