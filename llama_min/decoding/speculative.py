"""Speculative decoding: a cheap draft model proposes k tokens, the target model checks all of them in one forward.

Decoding one token at a time reads all of the target's weights per token. A draft (the same checkpoint
quantized to int8/int4, or a smaller model with the same vocabulary) is a few times cheaper per token. Each
round:

  1. the draft proposes x_1 .. x_k one after another (k cheap steps), keeping its distributions q_1 .. q_k;
  2. the target runs once over the pending token and x_1 .. x_k (k+1 positions, one pass over its weights),
     which gives its distributions p_1 .. p_{k+1} at every position;
  3. accept a prefix of the proposals and add one token of the target's own (below), so a round emits between
     1 and k+1 tokens for one pass over the target's weights.

Exactness (the output is distributed as the target's alone):
  greedy    accept x_i while it is the target's argmax; at the first mismatch emit the target's argmax instead
            (after k accepted, the target's argmax at position k+1, the "bonus"): token for token what plain
            greedy decoding gives.
  sampling  accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a token drawn
            from norm(max(0, p_i - q_i)) and end the round; after k accepted, draw the bonus from p_{k+1}.
            For one position: P(emit y) = q(y) min(1, p(y)/q(y)) + P(reject) r(y) = min(q(y), p(y)) +
            (p(y) - min(q(y), p(y))) = p(y), since P(reject) = sum_y max(0, q(y) - p(y)) = sum_y max(0, p(y) - q(y)).
p and q are the distributions the sampling settings draw from (temperature, top-k, min-p, Meta's top-p).

Rolling back is free: a rejected proposal's keys and values stay in the KV caches past the accepted length,
but every later step writes its own positions over them first and attends only to positions before its own.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..errors import LlamaMinError
from ..runtime.step import unchanged_model
from .sampling import Sampling, Stats, apply_repetition_penalty, elapsed, logprobs_of, tempered_probs


def sampling_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution `sample_next` draws from, (N, V) logits -> (N, V) probabilities (temperature > 0).

    softmax(logits / T); top-k and min-p zero the tokens they drop and renormalise; then Meta's top-p keeps
    each token whose cumulative mass (sorted descending) *before* it is <= top_p, and renormalises.
    """
    probs = tempered_probs(logits, s)
    probs_sort, idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > s.top_p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, idx, probs_sort)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where the target wants more mass than the draft gave (p itself if p == q)."""
    r = (p - q).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else p


def verify_greedy(target_choice: list, proposal: list):
    """Accepted count m and the target's token: target_choice (k+1 argmaxes) against proposal (k tokens)."""
    m = 0
    while m < len(proposal) and target_choice[m] == proposal[m]:
        m += 1
    return m, target_choice[m]


def verify_sampled(p: torch.Tensor, q: torch.Tensor, proposal: list, generator=None):
    """Accept/reject rule: p (k+1, V) target, q (k, V) draft, proposal x_1..x_k drawn from q -> (m, token).

    x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)) (u < p/q for u uniform in [0, 1));
    the first rejection emits a draw from norm(max(0, p_i - q_i)); after k accepted, a draw from p_{k+1}.
    """
    for i, x in enumerate(proposal):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, x] < p[i, x]:
            continue
        return i, int(torch.multinomial(residual(p[i], q[i]), 1, generator=generator))
    k = len(proposal)
    return k, int(torch.multinomial(p[k], 1, generator=generator))


class _Choice:
    """Per position: the greedy token or the sampling distribution, repetition penalty applied per history."""

    def __init__(self, s: Sampling, device):
        self.s, self.device = s, device

    def __call__(self, logits: torch.Tensor, histories: list):
        """logits (N, V) at N consecutive positions, histories[i] the tokens before position i ->
        (N,) argmax ids at temperature 0, else (N, V) probabilities."""
        if self.s.repetition_penalty != 1.0:
            logits = torch.cat([apply_repetition_penalty(logits[i:i + 1], torch.tensor([h], device=self.device),
                                                         self.s.repetition_penalty) for i, h in enumerate(histories)])
        if self.s.temperature == 0:
            return logits.argmax(dim=-1)
        return sampling_probs(logits, self.s)


def _propose(draft, tokens: list, d_valid: int, k: int, choose: _Choice, generator):
    """Draft k tokens after `tokens`, feeding what the draft's cache lacks -> (proposal, q (k, V) or None)."""
    proposal, dists = [], []
    feed, start = tokens[d_valid:], d_valid
    for _ in range(k):
        logits = draft.step(torch.tensor([feed], device=draft.device), start, last_only=True)[:, -1]
        dist = choose(logits, [tokens + proposal])
        x = int(dist[0]) if dist.ndim == 1 else int(torch.multinomial(dist[0], 1, generator=generator))
        dists.append(dist)
        proposal.append(x)
        start, feed = start + len(feed), [x]
    q = torch.cat(dists) if dists and dists[0].ndim == 2 else None
    return proposal, q


def speculative_generate(target, draft, prompt_tokens: list, max_gen_len: int, s: Sampling, draft_tokens: int = 4,
                         generator=None, stop_ids=None, on_token: Optional[Callable[[int, int], Optional[bool]]] = None,
                         logprobs: bool = False, echo: bool = False):
    """`Llama.generate` with a draft model (batch 1): the same (tokens, logprobs) result and stop rules.

    target, draft: `Llama` objects with the same vocabulary; draft_tokens: k, tokens proposed per round.
    Llama.stats.extra gets draft_tokens, proposed, accepted, acceptance_rate (accepted / proposed),
    target_passes and effective_tok_s (new tokens / seconds after the prompt's prefill).
    """
    _check(target, draft, prompt_tokens, draft_tokens)
    prompt = list(prompt_tokens[0])
    n0 = len(prompt)
    total_len = min(target.max_seq_len, n0 + max_gen_len)
    stop = set(target.tokenizer.stop_ids if stop_ids is None else stop_ids)
    choose = _Choice(s, target.device)
    stats = target.stats = Stats(prompt_tokens=n0)
    start = time.perf_counter()
    for llama in (target, draft):
        llama.model.setup_cache(1, total_len)
    prompt_lps = [0.0]  # with echo and logprobs: log p(prompt token | the tokens before it), 0 for the first
    try:
        if n0 > 1:  # prefill all but the last prompt token: each round feeds the pending token first
            want_all = logprobs and echo
            logits = target.step(torch.tensor([prompt[:-1]], device=target.device), 0, last_only=not want_all)
            if want_all:  # positions 0 .. n0-2 score prompt tokens 1 .. n0-1
                prompt_lps += logprobs_of(logits, torch.tensor([prompt[1:]], device=target.device))[0].tolist()
            draft.step(torch.tensor([prompt[:-1]], device=draft.device), 0, last_only=True)
        stats.prefill_s = elapsed(start, target.device)
        with unchanged_model(target.step), unchanged_model(draft.step):  # checked once, not every step
            tokens, lps, reason = _rounds(target, draft, prompt, total_len, draft_tokens, choose, generator,
                                          stop, on_token, logprobs, stats)
    finally:
        target.model.clear_cache()
        draft.model.clear_cache()
    stats.decode_s = elapsed(start, target.device) - stats.prefill_s
    stats.new_tokens = len(tokens) - n0
    stats.stop_reasons = [reason or ("max-new-tokens" if n0 + max_gen_len <= target.max_seq_len else "window full")]
    proposed = stats.extra["proposed"]
    stats.extra["acceptance_rate"] = stats.extra["accepted"] / proposed if proposed else 0.0
    stats.extra["effective_tok_s"] = stats.new_tokens / stats.decode_s if stats.decode_s > 0 else 0.0
    begin = 0 if echo else n0
    return [tokens[begin:]], ([(prompt_lps if echo else []) + lps] if logprobs else None)


def _rounds(target, draft, prompt, total_len, k, choose, generator, stop, on_token, logprobs, stats):
    """The draft-then-verify loop -> (tokens incl. the prompt, logprobs of the new ones, stop reason or None)."""
    tokens, lps = list(prompt), []
    d_valid = t_valid = len(prompt) - 1  # positions whose keys/values each cache holds for tokens[:valid]
    stats.extra.update(draft_tokens=k, proposed=0, accepted=0, target_passes=0)
    while len(tokens) < total_len:
        n = len(tokens)
        k_round = min(k, total_len - n - 1)  # the round emits at most k_round + 1 tokens
        proposal, q = _propose(draft, tokens, d_valid, k_round, choose, generator)
        feed = tokens[t_valid:] + proposal
        logits = target.step(torch.tensor([feed], device=target.device), t_valid)[0, -(k_round + 1):]  # (k+1, V)
        dist = choose(logits, [tokens + proposal[:i] for i in range(k_round + 1)])
        if dist.ndim == 1:
            m, y = verify_greedy(dist.tolist(), proposal)
        else:
            m, y = verify_sampled(dist, q, proposal, generator)
        new = proposal[:m] + [y]
        if logprobs:
            lps += logprobs_of(logits[None, : m + 1], torch.tensor([new], device=target.device))[0].tolist()
        stats.extra["proposed"] += k_round
        stats.extra["accepted"] += m
        stats.extra["target_passes"] += 1
        d_valid, t_valid = min(n + m, n + k_round - 1) if k_round else d_valid, n + m
        for t in new:
            if t in stop:
                return tokens, lps[: len(tokens) - len(prompt)], "end of turn"
            tokens.append(t)
            if on_token is not None and on_token(0, t):
                return tokens, lps[: len(tokens) - len(prompt)], "stop string"
    return tokens, lps, None


def _check(target, draft, prompt_tokens: list, k: int):
    if len(prompt_tokens) != 1:
        raise LlamaMinError(f"speculative decoding (draft=) takes one prompt at a time, got a batch of "
                            f"{len(prompt_tokens)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise LlamaMinError(f"draft_tokens (--draft-tokens) must be an integer >= 1, got {k!r}")
    if draft.model.vocab_size != target.model.vocab_size:
        raise LlamaMinError(f"the draft model (--draft) has a vocabulary of {draft.model.vocab_size} tokens, the "
                            f"target {target.model.vocab_size}: a draft must share the target's tokenizer")
    if draft.max_seq_len < target.max_seq_len:
        raise LlamaMinError(f"the draft model's max_seq_len {draft.max_seq_len} is below the target's "
                            f"{target.max_seq_len}")
