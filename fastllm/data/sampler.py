"""A deterministic, resumable sampler and a prefetching step loader.

Invariants:
- The order of epoch e is a permutation of range(n) seeded by (seed, e); every example is seen exactly once
  per epoch. A global batch may span two epochs (the end of one, the start of the next): nothing is dropped.
- The state is two ints (epoch, position) counting *consumed* global examples: `state_dict()` after k steps
  resumes at step k + 1 exactly, whatever was prefetched.
- With world_size > 1, rank r takes the r-th contiguous share of each global batch: no process assumes it is alone.
- The loader prepares batches in a background thread (`prefetch` ahead) using only per-example seeded
  generators, never the global RNG, so prefetching cannot change results.
"""
from __future__ import annotations

import queue
import threading

import torch


class DeterministicSampler:
    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise ValueError("the sampler needs at least one example")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.position = 0, 0
        self._orders: dict[int, torch.Tensor] = {}

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if not self.shuffle:
                self._orders = {epoch: torch.arange(self.n)}
            else:
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                self._orders = {epoch: torch.randperm(self.n, generator=g)}
        return self._orders[epoch]

    def take(self, count: int) -> list[tuple[int, int]]:
        """The next `count` (example index, epoch) pairs, advancing the position."""
        out = []
        while len(out) < count:
            k = min(count - len(out), self.n - self.position)
            out += [(int(i), self.epoch) for i in self.order(self.epoch)[self.position:self.position + k]]
            self.position += k
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['n']} examples with seed {state['seed']}, this data has "
                             f"{self.n} with seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


class StepLoader:
    """Yields, per optimizer step, this rank's list of micro-batches; prefetches in a daemon thread."""

    def __init__(self, data, sampler: DeterministicSampler, global_batch: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, prefetch: int = 2):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"batch_size {global_batch} must be a multiple of micro_batch_size {micro_batch} x "
                             f"world size {world_size}")
        self.data, self.sampler, self.global_batch, self.micro = data, sampler, global_batch, micro_batch
        self.rank, self.world, self.prefetch = rank, world_size, prefetch
        self._consumed = sampler.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    def _build(self) -> tuple[list[dict], dict]:
        picks = self.sampler.take(self.global_batch)
        share = self.global_batch // self.world
        mine = picks[self.rank * share:(self.rank + 1) * share]
        examples = [self.data.example(i, e) for i, e in mine]
        micro = [collate(examples[j:j + self.micro]) for j in range(0, len(examples), self.micro)]
        return micro, self.sampler.state_dict()

    def _worker(self, stop: threading.Event) -> None:
        while not stop.is_set():
            item = self._build()
            while not stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self) -> list[dict]:
        if self.prefetch <= 0:
            micro, self._consumed = self._build()
            return micro
        if self._thread is None:
            self._queue, self._stop = queue.Queue(self.prefetch), threading.Event()
            self._thread = threading.Thread(target=self._worker, args=(self._stop,), daemon=True)
            self._thread.start()
        micro, self._consumed = self._queue.get()
        return micro

    def state_dict(self) -> dict:
        """The sampler position after the last batch handed out (not after prefetched ones)."""
        return dict(self._consumed)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sampler.load_state_dict(state)
        self._consumed = self.sampler.state_dict()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
