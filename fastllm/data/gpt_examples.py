"""GPT causal-LM examples: documents packed into fixed-length blocks with a separator token.

Invariants:
- The token stream is doc_0 + [sep] + doc_1 + [sep] + ...; it is cut into blocks of exactly `block_size` tokens,
  the incomplete tail dropped. `labels` equal `input_ids` (the model shifts them). Deterministic, no randomness.
"""
from __future__ import annotations

import torch


def pack_documents(docs: list[list[int]], block_size: int, sep_id: int) -> torch.Tensor:
    """(N, block_size) long tensor of packed blocks."""
    stream = [t for doc in docs for t in (*doc, sep_id)]
    n = len(stream) // block_size
    return torch.tensor(stream[:n * block_size], dtype=torch.long).view(n, block_size)


class PackedLMData:
    """Indexable examples: `example(index, epoch)` is {"input_ids", "labels"} (T,)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def tokens_per_example(self) -> int:
        return self.blocks.shape[1]

    def example(self, index: int, epoch: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids}
