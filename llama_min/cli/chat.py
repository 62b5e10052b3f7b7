"""Chat over several turns on stdin (`llama-min chat`, the same as `llama-min generate --chat`).

One message per line (a line ending in "\\" continues; a block between two lines of three double quotes
is one message); the KV cache is kept across turns, so each turn prefills only its new tokens. Ctrl-C stops
an answer (it stays in the conversation); Ctrl-C twice, /exit or the end of input quits. Commands: /system
TEXT, /undo, /reset, /save FILE, /help. Piped input works:

  printf 'What is the capital of France?\\nAnd of Germany?\\n' | llama-min chat --temperature 0

Examples:
  llama-min chat
  llama-min chat -m path/to/Llama-3.2-1B-Instruct --system "You answer in one sentence."
"""

from __future__ import annotations

from typing import Optional

from .common import Parser, run_main
from .loading import add_model_flags, add_sampling_flags, check_flags, load_llama, sampling_kwargs


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--system", help="system message of the conversation (/system TEXT changes it)")
    p.add_argument("--prefill", default="", metavar="TEXT",
                   help="start every answer with TEXT, which the model continues (e.g. '{' for JSON)")
    p.add_argument("--verbose", action="store_true", help="say which decode step runs, and timing after every answer "
                   "(default: once at exit)")
    add_model_flags(p)
    add_sampling_flags(p)
    return p


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        args = build_parser(prog).parse_args(argv)
        args.chat, args.prompt = True, None
        check_flags(args)
        llama, _ = load_llama(args)
        return run_chat(llama, args)

    return run_main(body, argv)


def run_chat(llama, args) -> int:
    """The interactive chat (cli/repl.py): answers stream to stdout, notes and timing go to stderr."""
    from ..decoding.session import ChatSession
    from .repl import chat_loop

    session = ChatSession(llama, system=args.system, **sampling_kwargs(args))
    return chat_loop(session, args.max_new_tokens, verbose=getattr(args, "verbose", False), quiet=args.quiet,
                     prefill=getattr(args, "prefill", ""))
