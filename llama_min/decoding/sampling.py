"""Choosing the next token, and the timing record of a generation: shared by generate, chat and speculative
decoding.

  Sampling              the settings (checked by sampling_checks.check_sampling)
  sample_next           greedy at T = 0; else softmax(logits / T), top-k, min-p, Meta's top-p, one draw
  sample_top_p          Meta's nucleus rule: keep each token whose mass before it is <= p
  Stats                 seconds and token counts of the last generation (tokens/s reports)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .sampling_checks import check_sampling


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 = greedy (argmax)."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: for tokens already seen, divide positive logits by `penalty`, multiply negative ones.

    logits (B, V); history (B, S) token ids (negative = padding, ignored).
    """
    if penalty == 1.0 or history.numel() == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, history.clamp(min=0), (history >= 0).to(logits.dtype))
    seen = counts > 0
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_top_p(probs: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Meta's nucleus sampling: keep each token whose cumulative mass *before* it is <= p.

    So the token that crosses p is kept. probs (B, V) -> token ids (B,).
    """
    probs_sort, probs_idx = sorted_for_top_p(probs, p)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (B, 1) index into sorted
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def sorted_for_top_p(probs: torch.Tensor, p: float, tries=(64, 1024)):
    """torch.sort(probs, descending=True) as far as top-p reads it, without sorting the whole vocabulary.

    Sorting 49k probabilities takes ~3 ms, as long as SmolLM2's whole decode step. Top-p only reads the
    sorted values up to the nucleus's end, and the token ids where it keeps them; the rest is zeroed. So take
    the k largest (torch.topk, sorted), and put them first in an otherwise zero row: the values
    top-p keeps, and hence its mass sums, its renormalised row and its multinomial draw (same length, same
    random numbers drawn), are those of the full sort. The ids are the full sort's too while no two kept
    values are equal (with a tie, the order is the sort's own choice): otherwise, or when the nucleus does not
    end inside the k, a larger k, then the full sort. The ids past the k are never read (set to 0).
    """
    V = probs.shape[-1]
    for k in tries:
        if k >= V:
            break
        vals, idx = torch.topk(probs, k, dim=-1)  # (B, k), descending
        probs_sort = torch.zeros_like(probs)
        probs_sort[:, :k] = vals  # (B, V)
        zeroed = (torch.cumsum(probs_sort, dim=-1) - probs_sort > p)[:, :k]  # as sample_top_p computes it
        ends_inside = bool(zeroed[:, -1].all())
        untied = bool(((vals[:, 1:] < vals[:, :-1]) | zeroed[:, :-1]).all())  # each kept value above the next
        if ends_inside and untied:
            return probs_sort, torch.nn.functional.pad(idx, (0, V - k))
    return torch.sort(probs, dim=-1, descending=True)


def sample_next(logits: torch.Tensor, s: Sampling, history: Optional[torch.Tensor] = None, generator=None):
    """Choose the next token for each row of logits (B, V) under the sampling settings.

    With the default settings this is Meta's code step for step: argmax at temperature 0, else
    softmax(logits / T), then `sample_top_p`, one multinomial draw for the whole batch from `generator`
    (None = torch's global generator, as Meta's code uses).
    """
    if history is not None:
        logits = apply_repetition_penalty(logits, history, s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    return sample_top_p(tempered_probs(logits, s), s.top_p, generator)


def tempered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """softmax(logits / T) (temperature > 0), then top-k and min-p zero the tokens they drop and renormalise
    (only when set: Meta's path divides by nothing more). (N, V) -> (N, V); top-p comes after."""
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_k is not None and s.top_k < probs.shape[-1]:
        kth = torch.topk(probs, s.top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if s.min_p is not None:
        probs = probs.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if s.top_k is not None or s.min_p is not None:
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass
class Stats:
    """Timing of the last generate call (seconds, token counts), for tokens/s reports."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    stop_reasons: list = field(default_factory=list)  # per row: why it ended (see STOP_REASONS)
    extra: dict = field(default_factory=dict)


# Why a row ended: a stop token (end of turn / text), its max_gen_len, a stop string, or the window.
STOP_REASONS = ("end of turn", "max-new-tokens", "stop string", "window full")


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: logits (B, T, V), targets (B, T) -> (B, T)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]


def elapsed(start: float, device) -> float:
    """Seconds since `start`, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start

