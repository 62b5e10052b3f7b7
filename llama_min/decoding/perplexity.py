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
Any checkpoint Llama.build loads works, in any mode: float, --quantize int8/int4, a quantized GGUF packed
(the default for one) or dequantized (--dequantize).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import EnvironmentFailure, LlamaMinError


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="llama-min eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint (Meta dir, Hugging Face dir, .gguf, llama_min dir); default: the "
                   "default model")
    p.add_argument("--tokenizer", help="tokenizer file; default: found beside the checkpoint")
    p.add_argument("--data", required=True, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512, as llama.cpp)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="float weights in this dtype (a quantized GGUF is then dequantized)")
    p.add_argument("--quantize", choices=["int8", "int4", "int4-64", "int4-128"], default=None,
                   help="weight-only quantization of a float checkpoint")
    p.add_argument("--dequantize", action="store_true", help="run a quantized GGUF as float, not packed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.max_windows is not None and args.max_windows < 1):
        p.error("--batch-size and --max-windows must be >= 1")
    return args


def read_text(path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise LlamaMinError(f"--data {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise LlamaMinError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def run(args) -> dict:
    from ..generation import Llama

    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(args.data)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    llama = Llama.build(args.ckpt, args.tokenizer, max_seq_len=args.ctx, max_batch_size=args.batch_size,
                        device=args.device, dtype=dtype, quantize=args.quantize,
                        packed=False if args.dequantize else None)
    tok = llama.tokenizer
    tokens = tok.encode(text, bos=tok.add_bos, eos=False)
    result = perplexity(llama.model, tokens, args.ctx, tok.bos_id if tok.add_bos else None, args.batch_size,
                        args.max_windows, progress=not args.no_progress)
    linear = {type(m).__name__ for m in llama.model.modules() if "Linear" in type(m).__name__}
    result.update(ckpt=str(args.ckpt or "default model"), data=str(args.data), text_tokens=len(tokens),
                  layers=sorted(linear))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        r = run(args)
    except (LlamaMinError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, EnvironmentFailure) else 2
    except KeyboardInterrupt:
        print("[interrupted]", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['perplexity']:.4f} over {r['windows']} windows of {r['ctx']} tokens "
              f"({r['scored_tokens']} scored), {r['tokens_per_s']:.1f} tok/s, layers {', '.join(r['layers'])}")
    return 0
