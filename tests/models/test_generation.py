"""Generation: cached == uncached, filters respect top-k/top-p, seeded sampling repeats, EOS/stop, beams."""
import pytest
import torch

from fastllm.models import GPT, Transformer, beam_search, generate, stream_generate
from fastllm.models.generation import top_k_filter, top_p_filter
from tests.models.helpers import tiny_gpt, tiny_transformer


def _gpt():
    torch.manual_seed(0)
    return GPT(tiny_gpt()).eval()


def _prompt(b=2, t=5):
    return torch.randint(1, 97, (b, t), generator=torch.Generator().manual_seed(9))


def test_cached_equals_uncached_gpt_and_seq2seq():
    model, ids = _gpt(), _prompt()
    for kw in ({}, {"do_sample": True, "top_k": 10, "seed": 3}, {"repetition_penalty": 1.3}):
        assert torch.equal(generate(model, ids, max_new_tokens=12, **kw),
                           generate(model, ids, max_new_tokens=12, use_cache=False, **kw)), kw
    torch.manual_seed(1)
    t = Transformer(tiny_transformer()).eval()
    src = torch.randint(3, 61, (2, 7))
    assert torch.equal(generate(t, src, max_new_tokens=10), generate(t, src, max_new_tokens=10, use_cache=False))


def test_left_padding_gives_the_same_tokens_as_no_padding():
    model, ids = _gpt(), _prompt(1)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    a = generate(model, ids, max_new_tokens=8)[:, 5:]
    b = generate(model, padded, attention_mask=mask, max_new_tokens=8)[:, 8:]
    assert torch.equal(a, b)


def test_top_k_and_top_p_filters():
    logits = torch.randn(4, 50)
    kept = torch.isfinite(top_k_filter(logits, 7))
    assert (kept.sum(-1) == 7).all() and torch.equal(kept, logits >= logits.topk(7).values[:, -1:])
    filtered = top_p_filter(logits, 0.6)
    keep = torch.isfinite(filtered)
    probs = logits.softmax(-1)
    kept_mass = (probs * keep).sum(-1)
    smallest_kept = probs.masked_fill(~keep, 2.0).amin(-1)
    assert (kept_mass >= 0.6).all() and (kept_mass - smallest_kept < 0.6).all()  # minimal set reaching p


def test_sampled_tokens_stay_inside_top_k():
    model, ids = _gpt(), _prompt(1)
    out = generate(model, ids, max_new_tokens=1, do_sample=True, top_k=3, seed=0)
    allowed = model(ids).logits[0, -1].topk(3).indices
    hits = {int(generate(model, ids, max_new_tokens=1, do_sample=True, top_k=3, seed=s)[0, -1]) for s in range(20)}
    assert hits <= set(allowed.tolist()) and int(out[0, -1]) in allowed


def test_seeded_sampling_repeats_and_seeds_differ():
    model, ids = _gpt(), _prompt()
    a = generate(model, ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=11)
    b = generate(model, ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=11)
    c = generate(model, ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_and_stop_sequences_end_generation():
    model, ids = _gpt(), _prompt(1)
    greedy = generate(model, ids, max_new_tokens=6)[0, 5:].tolist()
    eos = greedy[2]
    out = generate(model, ids, max_new_tokens=6, eos_token_id=eos)[0, 5:].tolist()
    assert out[: out.index(eos) + 1] == greedy[: greedy.index(eos) + 1] and len(out) == greedy.index(eos) + 1
    stop = greedy[1:3]
    steps = list(stream_generate(model, ids, max_new_tokens=6, stop_sequences=[stop]))
    end = next(n for n in range(2, 7) if greedy[n - 2:n] == stop)  # first time the tail equals the stop
    assert [int(t) for t in steps] == greedy[:end]


def test_beam_search_one_beam_is_greedy_and_more_beams_score_higher():
    torch.manual_seed(2)
    model = Transformer(tiny_transformer()).eval()
    src = torch.randint(3, 61, (2, 7))
    greedy = generate(model, src, max_new_tokens=6)
    assert torch.equal(beam_search(model, src, num_beams=1, max_new_tokens=6, eos_token_id=999), greedy)

    def logprob(seq):
        logits = model(src, decoder_input_ids=seq[:, :-1]).logits.log_softmax(-1)
        return logits.gather(2, seq[:, 1:, None]).sum((1, 2))

    beams = beam_search(model, src, num_beams=4, max_new_tokens=6, eos_token_id=999, length_penalty=0.0)
    assert (logprob(beams) >= logprob(greedy) - 1e-5).all()  # fp32 rounding of two sums of 6 terms


def test_generate_methods_match_the_functions():
    model, ids = _gpt(), _prompt()
    kw = {"max_new_tokens": 6, "do_sample": True, "top_p": 0.9, "seed": 5}
    assert torch.equal(model.generate(ids, **kw), generate(model, ids, **kw))
    torch.manual_seed(2)
    t = Transformer(tiny_transformer()).eval()
    src = torch.randint(3, 61, (2, 7))
    assert torch.equal(t.generate(src, max_new_tokens=5), generate(t, src, max_new_tokens=5))
    assert torch.equal(t.generate(src, num_beams=3, max_new_tokens=5),
                       beam_search(t, src, num_beams=3, max_new_tokens=5))


def test_decoding_past_the_position_table_fails_before_any_work():
    torch.manual_seed(2)
    t = Transformer(tiny_transformer()).eval()
    src, limit = torch.randint(3, 61, (1, 4)), t.config.max_position_embeddings
    assert t.generate(src, max_new_tokens=limit).shape == (1, 1 + limit)  # start token + limit new ones
    for kw in ({}, {"num_beams": 2}):
        with pytest.raises(ValueError, match=f"needs {limit + 1} positions.*max_position_embeddings = {limit}"):
            t.generate(src, max_new_tokens=limit + 1, **kw)
