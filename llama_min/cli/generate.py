"""Complete a prompt, or chat, with any supported checkpoint (default: SmolLM2-135M-Instruct).

The completion streams to stdout as it is generated; load time, tokens/s and the achieved weight bandwidth go
to stderr (decoding one token reads every weight once, so GB/s is the number to watch). While the model
loads, a `loading ...` line says what is being read (only when stderr is a terminal; never with --quiet).

Examples:
  llama-min generate -p "The capital of France is" --temperature 0
  llama-min generate -m path/to/Llama-3.2-1B-Instruct -p "Hello" -n 50
  cat notes.txt | llama-min generate -p - -n 100        # the prompt from stdin
  llama-min generate --chat --system "Be brief."        # the same as: llama-min chat --system "Be brief."
"""

from __future__ import annotations

import sys
from typing import Optional

from . import chat
from .common import Parser, read_stdin_text, run_main, say
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
    p.add_argument("--verbose", action="store_true", help="with --chat: timing after every answer")
    p.add_argument("--prefill", default="", metavar="TEXT", help="with --chat: start every answer with TEXT")
    add_model_flags(p)
    add_sampling_flags(p)
    return p


def parse_args(argv=None, prog: Optional[str] = None):
    """The flags, checked (UsageError on a bad one); a `--prompt -` is read from stdin here."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    if not args.chat and args.prompt is None:
        p.error("give --prompt TEXT (or - for stdin), or --chat")
    check_flags(args)
    if args.prompt == "-" and not args.chat:
        args.prompt = read_stdin_text()
    return args


def run_completion(llama, args) -> None:
    """Stream the completion of args.prompt to stdout (the prompt itself is not echoed); say why it stopped."""
    tok = llama.tokenizer
    prompt = tok.encode(args.prompt, bos=tok.add_bos, eos=False)
    shown = []

    def show(row: int, text: str):
        shown.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    llama.generate([prompt], max_gen_len=args.max_new_tokens, stop=args.stop, on_text=show, **sampling_kwargs(args))
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        reason = llama.stats.stop_reasons[0]
        say(f"[stopped: {reason}]")
        if not "".join(shown).strip() and reason == "end of turn":
            say("[the model ended its turn at once: it is probably a chat model; try --chat]")


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        args = parse_args(argv, prog)
        llama, load_s = load_llama(args)
        if args.chat:
            return chat.run_chat(llama, args)
        run_completion(llama, args)
        if not args.quiet:
            report(llama, load_s)
        return 0

    return run_main(body, argv)
