"""Sampler: every example once per epoch, batches may span epochs, the position resumes exactly; the prefetching
loader reports the consumed position, and ranks split each global batch."""
import torch

from fastllm.data.gpt_examples import PackedLMData, pack_documents
from fastllm.data.sampler import DeterministicSampler, StepLoader


def test_every_example_once_per_epoch():
    s = DeterministicSampler(10, seed=3)
    picks = s.take(7) + s.take(7) + s.take(6)  # 20 = two epochs, batches cross the boundary
    for epoch in (0, 1):
        assert sorted(i for i, e in picks if e == epoch) == list(range(10))
    assert [i for i, e in picks if e == 0] != [i for i, e in picks if e == 1]  # reshuffled per epoch


def test_sampler_resumes_at_the_same_position():
    a = DeterministicSampler(13, seed=1)
    a.take(9)
    state = a.state_dict()
    rest = a.take(20)
    b = DeterministicSampler(13, seed=1)
    b.load_state_dict(state)
    assert b.take(20) == rest


def _data():
    return PackedLMData(pack_documents([list(range(1, 50))] * 10, 8, sep_id=0))


def test_loader_state_is_the_consumed_position_despite_prefetch():
    data = _data()
    loader = StepLoader(data, DeterministicSampler(len(data), 0), 4, 2, prefetch=3)
    first = [loader.next() for _ in range(3)]
    state = loader.state_dict()
    nxt = loader.next()
    loader.close()
    assert state == {"epoch": 0, "position": 12, "n": len(data), "seed": 0}
    again = StepLoader(data, DeterministicSampler(len(data), 0), 4, 2, prefetch=0)
    again.load_state_dict(state)
    got = again.next()
    assert len(first[0]) == 2 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(nxt, got))


def test_ranks_split_the_global_batch():
    data = _data()
    full = StepLoader(data, DeterministicSampler(len(data), 0), 4, 4, prefetch=0).next()[0]["input_ids"]
    parts = [StepLoader(data, DeterministicSampler(len(data), 0), 4, 2, rank=r, world_size=2, prefetch=0).next()[0]
             ["input_ids"] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), full)


def test_packing_with_separators():
    blocks = pack_documents([[5, 6, 7], [8, 9]], 3, sep_id=0)
    assert blocks.tolist() == [[5, 6, 7], [0, 8, 9]]  # the tail [0] is dropped
