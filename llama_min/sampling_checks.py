"""Checks of the sampling settings, one LlamaMinError naming the setting (and its command-line flag).

`check_sampling` is what `generation.Sampling` runs on construction: NaN and infinity are refused (NaN
slips through plain `<` comparisons), booleans are not numbers, and each value must lie in its range:

  temperature         finite, >= 0              (0 = greedy)
  top_p               in (0, 1]                 (Meta's nucleus: keep tokens whose mass before them <= p)
  top_k               None or an integer >= 1
  min_p               None or in [0, 1]         (keep tokens with p >= min_p * p_max)
  repetition_penalty  finite, > 0               (1 = off)
"""

from __future__ import annotations

import math

from .errors import LlamaMinError


def _number(name: str, value) -> float:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LlamaMinError(f"{name} ({flag}): {value!r}; expected a finite number")
    return float(value)


def check_sampling(temperature, top_p, top_k=None, min_p=None, repetition_penalty=1.0) -> None:
    """Raise one LlamaMinError for the first setting out of its type or range (see the module docstring)."""
    if _number("temperature", temperature) < 0:
        raise LlamaMinError(f"temperature (--temperature): {temperature!r}; expected >= 0 (0 = greedy)")
    if not 0 < _number("top_p", top_p) <= 1:
        raise LlamaMinError(f"top_p (--top-p): {top_p!r}; expected a number in (0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise LlamaMinError(f"top_k (--top-k): {top_k!r}; expected an integer >= 1 (or none)")
    if min_p is not None and not 0 <= _number("min_p", min_p) <= 1:
        raise LlamaMinError(f"min_p (--min-p): {min_p!r}; expected a number in [0, 1] (or none)")
    if _number("repetition_penalty", repetition_penalty) <= 0:
        raise LlamaMinError(f"repetition_penalty (--repetition-penalty): {repetition_penalty!r}; expected > 0")
