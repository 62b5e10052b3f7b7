"""Inside a real model: attention, RoPE pair use and the logit lens of one prompt, as pictures and numbers.

`llama-min inspect` runs the reference model (llama_min/model.py, float32; a quantized GGUF is dequantized)
once over the prompt and writes into --out:

  inspect.npz              the numbers (tokens, attention, distance_mass, rope_pair_q_norm, rope_pair_k_norm,
                           logit_lens_top, logit_lens_prob, and the token texts the pictures label with)
  inspect_attention.png    attention maps of a few heads, the prompt's tokens on the axes
  inspect_distance.png     attention mass against relative distance for every layer and head
  inspect_rope_pairs.png   the length of each RoPE pair of q and k against the pair's wavelength
  inspect_logit_lens.png   the top next token read after each block, coloured by probability

Every picture is drawn from inspect.npz alone (--redraw draws them again without the model).
The pictures need matplotlib: pip install 'llama_min[viz]'.

Examples:
  llama-min inspect -p "The capital of France is Paris. The capital of Italy is" --out inspect/
  llama-min inspect -m path/to/Llama-3.2-1B -p "..." --heads 0:3 12:5 -t 4
  llama-min inspect --redraw inspect/inspect.npz --out inspect/ --heads 3:1
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

from ..errors import LlamaMinError
from .common import Parser, UsageError, check_number, check_utf8, local_checkpoint, run_main, say
from .loading import announce_loading


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("-p", "--prompt", help="the text to run through the model (required unless --redraw)")
    p.add_argument("-m", "--ckpt", help="checkpoint (see `llama-min --help` for the formats); default: "
                   "SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer", help="tokenizer file; default: found beside the checkpoint")
    p.add_argument("--out", default="inspect", metavar="DIR", help="output folder (default: ./inspect)")
    p.add_argument("--heads", nargs="+", metavar="L:H", default=None,
                   help="attention maps of these layer:head pairs (default: the two clearest previous-token, "
                   "first-token and broad heads)")
    p.add_argument("--redraw", metavar="NPZ", help="draw the pictures from a saved inspect.npz; no model is run")
    p.add_argument("--no-pictures", action="store_true", help="write inspect.npz only (no matplotlib needed)")
    p.add_argument("--dpi", type=int, default=100, help="picture resolution (default 100)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="nothing on stderr but errors (no loading line, no timing)")
    return p


def parse_args(argv=None, prog: Optional[str] = None):
    """The flags, checked before anything is loaded (UsageError / LlamaMinError naming the flag)."""
    args = build_parser(prog).parse_args(argv)
    if (args.prompt is None) == (args.redraw is None):
        raise UsageError("give -p/--prompt TEXT (run the model) or --redraw NPZ (redraw its pictures), not both")
    if args.prompt is not None and not args.prompt:
        raise UsageError("-p/--prompt: empty text")
    if args.redraw is not None and (args.ckpt or args.tokenizer):
        raise UsageError("--redraw runs no model: it takes no -m/--ckpt or --tokenizer")
    check_number("--threads", args.threads, low=1, integer=True)
    check_number("--dpi", args.dpi, low=10, high=1000, integer=True)
    for flag in ("prompt", "ckpt", "tokenizer", "out", "redraw"):
        check_utf8("--" + flag, getattr(args, flag))
    args.heads = parse_heads(args.heads)
    if args.redraw is not None and not Path(args.redraw).is_file():
        raise LlamaMinError(f"--redraw {args.redraw}: no such file (expected an inspect.npz)")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise LlamaMinError(f"--tokenizer {args.tokenizer}: no such file or directory")
    args.ckpt = local_checkpoint(args.ckpt)
    return args


def parse_heads(values) -> Optional[list]:
    """['3:1', '0:0'] -> [(3, 1), (0, 0)]; anything else is a UsageError naming --heads."""
    if values is None:
        return None
    heads = []
    for value in values:
        m = re.fullmatch(r"(\d+):(\d+)", value)
        if not m:
            raise UsageError(f"--heads {value}: expected LAYER:HEAD, e.g. 0:3")
        heads.append((int(m.group(1)), int(m.group(2))))
    return heads


def check_heads(heads, data: dict) -> None:
    """Each asked-for layer:head exists in the npz's model."""
    L, H = data["attention"].shape[:2]
    for layer, head in heads or ():
        if layer >= L or head >= H:
            raise LlamaMinError(f"--heads {layer}:{head}: this model has layers 0-{L - 1} and heads 0-{H - 1}")


def run(args) -> list:
    """Compute (or load) the numbers, write inspect.npz and the pictures; returns the paths written."""
    from ..inspect import pictures  # numpy only: --redraw needs no torch

    if not args.no_pictures:
        pictures.require_matplotlib()  # before the model is loaded: a missing package costs no waiting
    out = Path(args.out)
    if args.redraw is not None:
        data, written = pictures.load_npz(args.redraw), []
    else:
        import torch  # here: `llama-min inspect --help` loads neither torch nor the model code

        from ..inspect import internals

        if args.threads:
            torch.set_num_threads(args.threads)
        start = time.perf_counter()
        data = internals.inspect_prompt(announce_loading(args.ckpt, args.quiet), args.prompt, args.tokenizer)
        written = [internals.save_npz(out / "inspect.npz", data)]
        if not args.quiet:
            L, H, T = data["distance_mass"].shape
            say(f"[{T} tokens through {L} layers x {H} heads in {time.perf_counter() - start:.1f} s]")
    check_heads(args.heads, data)
    if not args.no_pictures:
        written += pictures.draw(data, out, args.dpi, heads=args.heads)
    return written


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        for path in run(parse_args(argv, prog)):
            print(path)
        return 0

    return run_main(body, argv)
