"""Perplexity of a checkpoint on a text file, computed the way llama.cpp's `perplexity` tool does it.

  1. Tokenize the whole text once (BOS first when the tokenizer adds one to plain text).
  2. Cut the tokens into non-overlapping windows of n_ctx tokens; a tail shorter than n_ctx is dropped.
  3. Run each window on its own from position 0 (no cache, plain causal attention). When the tokenizer
     adds BOS, the window's first token is replaced by BOS, as a model sees the start of a text.
  4. Score only the second half of each window, where every prediction has at least n_ctx/2 tokens of
     context: the logits at positions p = n_ctx/2 .. n_ctx-2 against the token at p + 1, i.e.
     n_ctx - 1 - n_ctx/2 tokens per window (255 for n_ctx = 512).
  5. perplexity = exp(mean negative log-likelihood over every scored token).

The same text, tokenizer and n_ctx give numbers comparable with llama.cpp's (`llama-perplexity -c N`).
`perplexity` takes any model (tokens -> logits); the command `llama-min eval` (llama_min/cli/eval.py) runs it
on any checkpoint Llama.build loads, in any mode: float, --quantize int8/int4, a quantized GGUF packed (the
default for one) or dequantized (--dequantize).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import LlamaMinError


def windows(tokens: list, n_ctx: int, bos_id: Optional[int]) -> list:
    """Non-overlapping windows of n_ctx tokens (the short tail dropped), first token replaced by BOS if given."""
    if n_ctx < 4:
        raise LlamaMinError(f"--ctx {n_ctx}: expected at least 4 tokens per window")
    if len(tokens) < n_ctx:
        raise LlamaMinError(f"the text has {len(tokens)} tokens, fewer than one window of --ctx {n_ctx}")
    out = [list(tokens[i : i + n_ctx]) for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]
    if bos_id is not None:
        for w in out:
            w[0] = bos_id
    return out


@torch.inference_mode()
def window_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64) of each window's scored tokens: logits at n_ctx/2 .. n_ctx-2 vs the next token.

    batch (B, n_ctx) token ids -> (B,) sums over n_ctx - 1 - n_ctx/2 tokens each.
    """
    first = batch.shape[1] // 2
    logits = model(batch)[:, first:-1].float()  # (B, n_scored, V)
    targets = batch[:, first + 1 :]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(batch.shape[0], -1).double().sum(dim=1)


def perplexity(model, tokens: list, n_ctx: int = 512, bos_id: Optional[int] = None, batch_size: int = 1,
               max_windows: Optional[int] = None, progress: bool = True) -> dict:
    """llama.cpp's perplexity of `model` (tokens (B, T) -> logits (B, T, V)) over `tokens`; see the module doc.

    Returns {"perplexity", "nll" (mean), "windows", "scored_tokens", "ctx", "seconds", "tokens_per_s"}.
    """
    from tqdm import tqdm

    wins = windows(tokens, n_ctx, bos_id)[:max_windows]
    device = next(iter(model.buffers()), None)
    device = device.device if device is not None else next(model.parameters()).device
    total, count, start = 0.0, 0, time.perf_counter()
    bar = tqdm(total=len(wins), unit="window", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for i in range(0, len(wins), batch_size):
        batch = torch.tensor(wins[i : i + batch_size], device=device)
        total += float(window_nll(model, batch).sum())
        count += batch.shape[0] * (n_ctx - 1 - n_ctx // 2)
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total / count):.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    return {"perplexity": math.exp(total / count), "nll": total / count, "windows": len(wins),
            "scored_tokens": count, "ctx": n_ctx, "seconds": seconds,
            "tokens_per_s": len(wins) * n_ctx / seconds if seconds > 0 else float("inf")}
