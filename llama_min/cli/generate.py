"""Complete a prompt, or chat, with any supported checkpoint (default: SmolLM2-135M-Instruct).

The completion streams to stdout as it is generated; load time, tokens/s and the achieved weight bandwidth go
to stderr (decoding one token reads every weight once, so GB/s is the number to watch). While the model
loads, a `loading ...` line says what is being read (only when stderr is a terminal; never with --quiet).

Examples:
  llama-min generate -p "The capital of France is" --temperature 0
  llama-min generate -m path/to/Llama-3.2-1B-Instruct -p "Hello" -n 50
  cat notes.txt | llama-min generate -p - -n 100        # the prompt from stdin
  llama-min generate --chat --system "Be brief."        # the same as: llama-min chat --system "Be brief."
  llama-min generate -p "Once upon a time" --temperature 0 --draft-quantize int8   # speculative, own int8 draft
"""

from __future__ import annotations

import sys
from typing import Optional

from . import chat
from .common import Parser, check_number, checkpoint_format, read_stdin_text, run_main, say
from .loading import add_model_flags, add_sampling_flags, check_flags, load_llama, report, sampling_kwargs


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("-p", "--prompt", help="text to complete ('-' reads it from stdin); required unless --chat")
    p.add_argument("--chat", action="store_true", help="multi-turn chat on stdin (one message per line; "
                   "/reset clears the conversation, /exit or end of input quits)")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the completion where this text appears (matched on the text, not on tokens; "
                   "never printed); repeat for several")
    p.add_argument("--verbose", action="store_true", help="say which decode step runs (llama_min's C step, the model's forward, "
                   "compiled); with --chat, timing after every answer")
    p.add_argument("--prefill", default="", metavar="TEXT", help="with --chat: start every answer with TEXT")
    add_model_flags(p)
    add_sampling_flags(p)
    p.add_argument("--compile", action="store_true", help="run one-token decode steps through torch.compile "
                   "(with a draft, the draft's: the model then only checks several tokens at once); compiles for "
                   "a few minutes on a CPU first, the time goes to stderr")
    p.add_argument("--draft", metavar="CKPT", help="speculative decoding: a smaller checkpoint with the same "
                   "tokenizer proposes tokens, the model checks them in one pass (same output distribution)")
    p.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="quantize the draft; without --draft, the draft is the checkpoint itself quantized")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step (default 4)")
    return p


def parse_args(argv=None, prog: Optional[str] = None):
    """The flags, checked (UsageError on a bad one); a `--prompt -` is read from stdin here."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    if not args.chat and args.prompt is None:
        p.error("give --prompt TEXT (or - for stdin), or --chat")
    check_flags(args)
    check_number("--draft-tokens", args.draft_tokens, low=1, integer=True)
    if (args.draft or args.draft_quantize) and args.chat:
        p.error("--draft/--draft-quantize work with --prompt, not --chat")
    if args.draft is not None:
        checkpoint_format(args.draft, "--draft")
    if args.prompt == "-" and not args.chat:
        args.prompt = read_stdin_text()
    return args


def load_speedups(llama, args):
    """The draft model for speculative decoding (or None), and --compile; the compile time on stderr."""
    draft = None
    if args.draft or args.draft_quantize:  # llama_min/decoding/speculative.py
        from ..generation import Llama

        draft = Llama.build(args.draft or args.ckpt, None if args.draft else args.tokenizer,
                            max_seq_len=args.max_seq_len, max_batch_size=1, device=llama.device,
                            dtype=llama.model.norm.weight.dtype, seed=args.seed, quantize=args.draft_quantize)
    # with a draft, the model itself only checks several tokens at once (eager): only the draft's steps compile
    for model in ([draft] if draft is not None else [llama]) if args.compile else []:
        model.compile()
        if not args.quiet:
            say(f"[compiled the {'draft' if model is draft else 'decode'} step in {model.compile_s:.1f} s]")
    return draft


def run_completion(llama, args, draft=None) -> None:
    """Stream the completion of args.prompt to stdout (the prompt itself is not echoed); say why it stopped."""
    tok = llama.tokenizer
    prompt = tok.encode(args.prompt, bos=tok.add_bos, eos=False)
    shown = []

    def show(row: int, text: str):
        shown.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    llama.generate([prompt], max_gen_len=args.max_new_tokens, stop=args.stop, on_text=show, draft=draft,
                   draft_tokens=args.draft_tokens, **sampling_kwargs(args))
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        reason = llama.stats.stop_reasons[0]
        flag = {"max-new-tokens": f" (-n {args.max_new_tokens})", "window full": f" (-c {args.max_seq_len})"}
        say(f"[stopped: {reason}{flag.get(reason, '')}]")
        if not "".join(shown).strip() and reason == "end of turn":
            say("[the model ended its turn at once: it is probably a chat model; try --chat]")


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        args = parse_args(argv, prog)
        llama, load_s = load_llama(args)
        draft = load_speedups(llama, args)
        if args.chat:
            return chat.run_chat(llama, args)
        run_completion(llama, args, draft)
        if not args.quiet:
            report(llama, load_s)
        return 0

    return run_main(body, argv)
