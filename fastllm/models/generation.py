"""Text generation with a KV cache for GPT and the encoder-decoder Transformer.

Invariants:
- stream_generate yields one (B,) tensor of new tokens per step; generate collects them and returns
  (B, prompt + new) ids for GPT and (B, 1 + new) decoder ids (starting with the start token) for Transformer.
- Logit processing order (as HF): repetition penalty (CTRL: divide positive / multiply negative scores of
  tokens already in the sequence), temperature, top-k, top-p (the smallest set whose probability >= top_p,
  always at least one token). Greedy when do_sample=False.
- A sequence finishes at eos_token_id or when its generated tail equals one of stop_sequences (token-id lists); finished sequences emit
  pad_token_id; generation ends when all are finished or after max_new_tokens.
- use_cache=True feeds only the new token each step; use_cache=False recomputes the whole sequence. Both pick
  the same tokens (up to float rounding of the logits).
- seed makes sampling repeat exactly (a private torch.Generator); without it torch's default generator is used.
- beam_search (encoder-decoder): finished beams are frozen (they extend with pad at log-prob 0); the result is
  the beam with the best score / length ** length_penalty. num_beams=1 is greedy decoding.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from fastllm.models.gpt import GPT
from fastllm.models.transformer import Transformer


# ------------------------------------------------------------------------------------------ logit processing
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, T) ids. CTRL's penalty on every token already present."""
    if penalty == 1.0:
        return logits
    score = logits.gather(1, seen)  # (B, T)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, seen, score)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    srt, idx = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = srt.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    drop = before >= p  # the first token always stays (before = 0 < p)
    return logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))


def process_logits(logits, seen, *, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)  # (B, V)
    if temperature != 1.0:
        logits = logits / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k} top_p={top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


# ------------------------------------------------------------------------------------------ model adapters
class _GPTState:
    """Runs a GPT: prefill() on the prompt, then step(new) per token (the whole sequence again without cache)."""

    def __init__(self, model: GPT, ids, attention_mask, use_cache: bool):
        self.model, self.use_cache, self.past, self.ids = model, use_cache, None, ids
        self.mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

    def prefill(self) -> torch.Tensor:
        return self._run(self.ids)

    def step(self, new: torch.Tensor) -> torch.Tensor:
        """Appends new ids (B, 1); returns the next-token logits (B, V)."""
        self.ids = torch.cat([self.ids, new], dim=1)  # (B, T)
        self.mask = torch.cat([self.mask, torch.ones_like(new, dtype=torch.bool)], dim=1)  # (B, T)
        return self._run(new if self.use_cache else self.ids)

    def _run(self, feed: torch.Tensor) -> torch.Tensor:
        pos = (self.mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding does not shift positions
        out = self.model(feed, attention_mask=self.mask, position_ids=pos[:, -feed.shape[1]:],
                         past_key_values=self.past, use_cache=self.use_cache, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]  # (B, V)

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError("beam search is implemented for the encoder-decoder only")


class _Seq2SeqState:
    """Encodes the source once, then decodes like _GPTState."""

    def __init__(self, model: Transformer, src, attention_mask, start: torch.Tensor, use_cache: bool):
        self.model, self.use_cache, self.past, self.src_mask = model, use_cache, None, attention_mask
        self.memory = model.encode(src, attention_mask)  # (B, S, d)
        self.ids = start  # (B, 1)

    def prefill(self) -> torch.Tensor:
        return self._run(self.ids)

    def step(self, new: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, new], dim=1)  # (B, L)
        return self._run(new if self.use_cache else self.ids)

    def _run(self, feed: torch.Tensor) -> torch.Tensor:
        out = self.model(attention_mask=self.src_mask, decoder_input_ids=feed, encoder_outputs=self.memory,
                         past_key_values=self.past, use_cache=self.use_cache, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]  # (B, V)

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps rows `index` (beam search): ids, memory, mask and every cached tensor."""
        pick = (lambda t: None if t is None else t.index_select(0, index))
        self.ids, self.memory, self.src_mask = pick(self.ids), pick(self.memory), pick(self.src_mask)
        if self.past is not None:
            self.past = tuple(tuple(tuple(pick(t) for t in kv) for kv in layer) for layer in self.past)


def _check_room(model, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """A ValueError before any work when the positions the decoding needs exceed the model's table (the last
    new token is never fed back: a prompt of T takes T + n - 1 positions, the seq2seq decoder n)."""
    if isinstance(model, GPT):
        need, limit, what = input_ids.shape[1] + max_new_tokens - 1, model.config.n_positions, "n_positions"
    elif isinstance(model, Transformer):
        need, limit, what = max_new_tokens, model.config.max_position_embeddings, "max_position_embeddings"
    else:
        return
    if need > limit:
        raise ValueError(f"generate: prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} needs "
                         f"{need} positions, more than the model's {what} = {limit}")


def _state(model, input_ids, attention_mask, use_cache, decoder_start_token_id):
    if isinstance(model, GPT):
        return _GPTState(model, input_ids, attention_mask, use_cache)
    if isinstance(model, Transformer):
        start_id = model.config.bos_token_id if decoder_start_token_id is None else decoder_start_token_id
        start = input_ids.new_full((input_ids.shape[0], 1), start_id)  # (B, 1)
        return _Seq2SeqState(model, input_ids, attention_mask, start, use_cache)
    raise TypeError(f"generate: {type(model).__name__} is not a GPT or Transformer")


# ------------------------------------------------------------------------------------------ decoding loops
def _stopped(ids: torch.Tensor, stop_sequences) -> torch.Tensor:
    """(B,) bool: the tail of ids (B, T) equals one of the stop sequences."""
    hit = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for seq in stop_sequences or ():
        n = len(seq)
        if 0 < n <= ids.shape[1]:
            hit |= (ids[:, -n:] == torch.tensor(seq, device=ids.device)).all(dim=1)
    return hit


def _pick(logits, state_ids, do_sample, generator, opts) -> torch.Tensor:
    if not do_sample:
        return apply_repetition_penalty(logits.float(), state_ids, opts["repetition_penalty"]).argmax(-1)  # (B,)
    probs = process_logits(logits, state_ids, **opts).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


@torch.no_grad()
def stream_generate(model, input_ids: torch.Tensor, *, attention_mask=None, max_new_tokens: int = 20,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, eos_token_id: int | None = None, stop_sequences=None,
                    pad_token_id: int | None = None, seed: int | None = None, use_cache: bool = True,
                    decoder_start_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yields the (B,) next tokens one step at a time (see the module doc for the options)."""
    _check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    was_training = model.training
    model.eval()
    try:
        yield from _stream(model, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id,
                           stop_sequences, pad_token_id, seed, use_cache, decoder_start_token_id,
                           {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                "repetition_penalty": repetition_penalty})
    finally:
        model.train(was_training)


def _stream(model, input_ids, attention_mask, max_new_tokens, do_sample, eos, stops, pad, seed, use_cache,
            start, opts):
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    _check_room(model, input_ids, max_new_tokens)
    state = _state(model, input_ids, attention_mask, use_cache, start)
    prompt_len = state.ids.shape[1]
    pad = pad if pad is not None else (eos if eos is not None else 0)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)
    logits = state.prefill() if max_new_tokens > 0 else None
    for i in range(max_new_tokens):
        tok = _pick(logits, state.ids, do_sample, generator, opts).masked_fill(done, pad)  # (B,)
        yield tok
        done = done | (tok == eos if eos is not None else False)
        if i + 1 == max_new_tokens:
            break
        logits = state.step(tok[:, None])
        done = done | _stopped(state.ids[:, prompt_len:], stops)  # only generated tokens can match
        if bool(done.all()):
            break


def generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """All of stream_generate's tokens appended to the prompt (GPT) or to the start token (Transformer)."""
    new = list(stream_generate(model, input_ids, **kwargs))
    if isinstance(model, Transformer):
        start = kwargs.get("decoder_start_token_id")
        start = model.config.bos_token_id if start is None else start
        input_ids = input_ids.new_full((input_ids.shape[0], 1), start)  # (B, 1)
    return torch.cat([input_ids, *(t[:, None] for t in new)], dim=1)  # (B, T + n)


@torch.no_grad()
def beam_search(model: Transformer, input_ids: torch.Tensor, *, attention_mask=None, num_beams: int = 4,
                max_new_tokens: int = 50, length_penalty: float = 1.0, eos_token_id: int | None = None,
                pad_token_id: int | None = None, decoder_start_token_id: int | None = None) -> torch.Tensor:
    """Beam search for the encoder-decoder: (B, S) source -> (B, 1 + n) best decoder ids (pad after EOS)."""
    if not isinstance(model, Transformer):
        raise TypeError("beam_search supports the encoder-decoder Transformer")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    c, was_training = model.config, model.training
    model.eval()
    eos = c.eos_token_id if eos_token_id is None else eos_token_id
    pad = c.pad_token_id if pad_token_id is None else pad_token_id
    _check_room(model, input_ids, max_new_tokens)
    b, k = input_ids.shape[0], num_beams
    rows = torch.arange(b, device=input_ids.device).repeat_interleave(k)  # (B*K,)
    mask = None if attention_mask is None else attention_mask.index_select(0, rows)
    state = _state(model, input_ids.index_select(0, rows), mask, True, decoder_start_token_id)
    try:
        ids = _beam_loop(state, b, k, max_new_tokens, eos, pad, length_penalty)
    finally:
        model.train(was_training)
    return ids


def _beam_loop(state, b, k, steps, eos, pad, alpha) -> torch.Tensor:
    scores = torch.full((b, k), float("-inf"), device=state.ids.device)
    scores[:, 0] = 0.0  # (B, K): all beams start identical; only the first is alive
    finished = torch.zeros(b * k, dtype=torch.bool, device=state.ids.device)
    lengths = torch.zeros(b * k, device=state.ids.device)
    logits = state.prefill()
    for i in range(steps):
        logp = logits.float().log_softmax(-1)  # (B*K, V)
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, pad] = 0.0  # a finished beam extends with pad at no cost
        logp = torch.where(finished[:, None], frozen, logp)
        v = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(b, k * v)  # (B, K*V)
        scores, flat = cand.topk(k, dim=-1)  # (B, K)
        src = (flat // v + torch.arange(b, device=flat.device)[:, None] * k).view(-1)  # (B*K,) beams kept
        tok = (flat % v).view(-1)  # (B*K,)
        state.reorder(src)
        finished, lengths = finished[src], lengths[src] + (~finished[src]).float()
        finished = finished | (tok == eos)
        if i + 1 == steps or bool(finished.all()):
            state.ids = torch.cat([state.ids, tok[:, None]], dim=1)
            break
        logits = state.step(tok[:, None])
    norm = scores.view(-1) / lengths.clamp(min=1) ** alpha  # (B*K,)
    best = norm.view(b, k).argmax(-1) + torch.arange(b, device=norm.device) * k  # (B,)
    return state.ids.index_select(0, best)  # (B, 1 + n)
