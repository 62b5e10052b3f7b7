"""Perplexity of a checkpoint on a text file, computed the way llama.cpp's `perplexity` tool does it.

`llama-min eval`: the checkpoint is built with Llama.build (any format, float or quantized), the text read
as stored (bytes decoded as UTF-8, line endings kept: a CRLF file is scored with its CRLFs, as
llama-perplexity reads it) and tokenized once; the windows and the scoring are
llama_min.decoding.perplexity's: non-overlapping windows of --ctx tokens, each scored on its second half.

Examples:
  llama-min eval --data alice29.txt                       # the default model, 512-token windows
  llama-min eval -m path/to/Llama-3.2-1B --data wiki.test.raw -c 1024 --max-windows 16
  llama-min eval --data notes.txt --dequantize --json     # the GGUF's weights as float32, one JSON line
  llama-min eval -m runs/tiny/final --data notes.txt -c 1024 --rope-scaling linear:4   # past the trained window
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import LlamaMinError
from .common import Parser, check_number, check_utf8, feedback_on, local_checkpoint, run_main, say
from .loading import (add_layout_cache_flag, add_rope_scaling_flag, announce_loading, check_rope_scaling,
                      warn_past_trained_window)

QUANTIZE = ("int8", "int4", "int4-64", "int4-128")


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file to score (read as stored)")
    p.add_argument("-m", "--ckpt", help="checkpoint (see `llama-min --help` for the formats); default: "
                   "SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer", help="tokenizer file; default: found beside the checkpoint")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per window (default 512, as llama.cpp)")
    add_rope_scaling_flag(p)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="float weights in this dtype (a quantized GGUF is then dequantized)")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="weight-only quantization of a float checkpoint")
    p.add_argument("--dequantize", action="store_true", help="run a quantized GGUF as float, not packed")
    add_layout_cache_flag(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", "--no-progress", action="store_true",
                   help="nothing on stderr but errors (no loading line, no progress bar)")
    return p


def parse_args(argv=None, prog: Optional[str] = None):
    """The flags, checked before anything is loaded (UsageError / LlamaMinError naming the flag)."""
    args = build_parser(prog).parse_args(argv)
    check_number("--ctx", args.ctx, low=4, integer=True)
    check_number("--batch-size", args.batch_size, low=1, integer=True)
    check_number("--max-windows", args.max_windows, low=1, integer=True)
    check_number("--threads", args.threads, low=1, integer=True)
    for flag in ("ckpt", "tokenizer", "data"):
        check_utf8("--" + flag, getattr(args, flag))
    check_rope_scaling(args.rope_scaling)
    if not Path(args.data).is_file():
        raise LlamaMinError(f"--data {args.data}: {'a folder' if Path(args.data).is_dir() else 'no such file'}")
    args.ckpt = local_checkpoint(args.ckpt)
    return args


def read_text(path) -> str:
    """The file's text as stored: UTF-8, every line ending kept as it is (newline="" turns off Python's
    CRLF -> LF translation, so a CRLF file is scored as its bytes say, as llama-perplexity does)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise LlamaMinError(f"--data {path}: no such file") from None
    except IsADirectoryError:
        raise LlamaMinError(f"--data {path}: a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise LlamaMinError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def weights_words(model) -> str:
    """'4-bit + 8-bit' / 'Q4_1 + Q8_0' / 'float32': the precisions of the model's matrices, in words."""
    bits = {"Int4": "4-bit", "Int8": "8-bit"}
    words = {getattr(m, "ggml_type", None) or bits.get(type(m).__name__[:4], None)  # a file's blocks: Q4_0, ...
             for m in model.modules() if "Linear" in type(m).__name__}
    float_name = str(model.norm.weight.dtype).removeprefix("torch.")
    return " + ".join(sorted(w if w is not None else float_name for w in words))


def run(args) -> dict:
    """Build the checkpoint's Llama, tokenize --data, score it: perplexity()'s result plus what was run."""
    import torch  # here: `llama-min eval --help` loads neither torch nor the model code

    from ..decoding.perplexity import perplexity
    from ..generation import Llama
    from ..runtime.memory import check_window

    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(args.data)
    path = announce_loading(args.ckpt, args.quiet)
    llama = Llama.build(path, args.tokenizer, max_seq_len=args.ctx, max_batch_size=args.batch_size,
                        device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                        quantize=args.quantize, packed=False if args.dequantize else None,
                        rope_scaling=args.rope_scaling, layout_cache=args.layout_cache)
    if args.rope_scaling is None:  # a scaling given: the user chose how to go past the window
        warn_past_trained_window(llama, args.ctx, "--ctx", args.quiet)
    check_window(llama.model.params, args.ctx, args.batch_size, llama.device,  # the logits of whole windows
                 llama.model.norm.weight.element_size(), scored=args.ctx)
    tok = llama.tokenizer
    tokens = tok.encode(text, bos=tok.add_bos, eos=False)
    result = perplexity(llama.model, tokens, args.ctx, tok.bos_id if tok.add_bos else None, args.batch_size,
                        args.max_windows, progress=feedback_on(args.quiet))
    linear = {type(m).__name__ for m in llama.model.modules() if "Linear" in type(m).__name__}
    result.update(ckpt=str(path), data=str(args.data), text_tokens=len(tokens), layers=sorted(linear),
                  rope_scaling=args.rope_scaling,
                  weights=weights_words(llama.model),
                  all_windows=(len(tokens) // args.ctx))
    return result


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        args = parse_args(argv, prog)
        r = run(args)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"perplexity {r['perplexity']:.4f} over {r['windows']} windows of {r['ctx']} tokens "
                  f"({r['scored_tokens']} scored), {r['tokens_per_s']:.1f} tok/s, weights {r['weights']}")
        if not args.quiet:
            done = r["windows"] == r["all_windows"]
            say(f"[stopped: scored every window of the text ({r['text_tokens']} tokens)]" if done else
                f"[stopped: --max-windows {r['windows']} of the text's {r['all_windows']} windows]")
        return 0

    return run_main(body, argv)
