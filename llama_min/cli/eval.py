"""Perplexity of a checkpoint on a text file, computed the way llama.cpp's `perplexity` tool does it.

`llama-min eval`: the checkpoint is built with Llama.build (any format, float or quantized), the text read
and tokenized here; the windows and the scoring are llama_min.decoding.perplexity's (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ..errors import EnvironmentFailure, LlamaMinError
from .common import run_main


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
    """Build the checkpoint's Llama, tokenize --data, score it: perplexity()'s result plus what was run."""
    import torch  # lazy: `llama-min --help` loads neither torch nor the model code

    from ..decoding.perplexity import perplexity
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


def evaluate(argv) -> int:
    """The command without --debug (run_main handles that): parse, run, print; its own exit codes."""
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


def main(argv=None, prog: Optional[str] = None) -> int:
    """`prog` is unused: the command's own parser names itself. --debug is taken here, not passed on."""
    return run_main(lambda argv: evaluate([a for a in argv if a != "--debug"]), argv)
