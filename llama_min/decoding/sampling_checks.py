"""Checks of the sampling settings, one LlamaMinError naming the setting (and its command-line flag).

`check_sampling` is what `generation.Sampling` runs on construction: NaN and infinity are refused (NaN
slips through plain `<` comparisons), booleans are not numbers, and each value must lie in its range:

  temperature         0 (greedy), or finite and >= 1e-3
  top_p               in [0, 1]                 (Meta's nucleus: keep tokens whose mass before them <= p;
                                                 0 keeps only the most likely one)
  top_k               None or an integer >= 1
  min_p               None or in [0, 1]         (keep tokens with p >= min_p * p_max)
  repetition_penalty  in [1e-3, 1e3]            (1 = off)

The bounds 1e-3 keep `logits / temperature` and `logits * penalty` finite in float32 (found by fuzzing: a
temperature of 2e-43 turns the logits into infinities and softmax into NaN); a temperature that small is
greedy decoding anyway, which 0 asks for exactly.
"""

from __future__ import annotations

import math

from ..errors import LlamaMinError

MIN_TEMPERATURE = 1e-3


def _number(name: str, value) -> float:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LlamaMinError(f"{name} ({flag}): {value!r}; expected a finite number")
    return float(value)


def check_sampling(temperature, top_p, top_k=None, min_p=None, repetition_penalty=1.0) -> None:
    """Raise one LlamaMinError for the first setting out of its type or range (see the module docstring)."""
    t = _number("temperature", temperature)
    if t != 0 and not t >= MIN_TEMPERATURE:
        raise LlamaMinError(f"temperature (--temperature): {temperature!r}; expected 0 (greedy) or a number "
                            f">= {MIN_TEMPERATURE}")
    if not 0 <= _number("top_p", top_p) <= 1:
        raise LlamaMinError(f"top_p (--top-p): {top_p!r}; expected a number in [0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise LlamaMinError(f"top_k (--top-k): {top_k!r}; expected an integer >= 1 (or none)")
    if min_p is not None and not 0 <= _number("min_p", min_p) <= 1:
        raise LlamaMinError(f"min_p (--min-p): {min_p!r}; expected a number in [0, 1] (or none)")
    if not 1e-3 <= _number("repetition_penalty", repetition_penalty) <= 1e3:
        raise LlamaMinError(f"repetition_penalty (--repetition-penalty): {repetition_penalty!r}; expected a number "
                            "in [0.001, 1000] (1 = off)")
