"""Chat over several turns on stdin (`llama-min chat`, the same as `llama-min generate --chat`).

One message per line; the KV cache is kept across turns, so each turn prefills only its new tokens.
/reset clears the conversation, /exit (or the end of input) quits. Piped input works:

  printf 'What is the capital of France?\\nAnd of Germany?\\n' | llama-min chat --temperature 0

Examples:
  llama-min chat
  llama-min chat -m path/to/Llama-3.2-1B-Instruct --system "You answer in one sentence."
"""

from __future__ import annotations

import sys
from typing import Optional

from ..errors import LlamaMinError
from .common import Parser, decode_utf8, feedback_on, run_main, say, stdin_bytes
from .loading import add_model_flags, add_sampling_flags, check_flags, load_llama, report, sampling_kwargs, \
    stream_printer


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--system", help="system message of the conversation")
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


def read_message(line_no: int, interactive: bool) -> Optional[str]:
    """The next line of stdin (None at the end), strictly UTF-8; the prompt goes to stderr when interactive."""
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    raw = stdin_bytes()
    if raw is None:  # a text-only stdin (tests)
        line = sys.stdin.readline()
        return line or None
    data = raw.readline()
    return decode_utf8(data, f"stdin line {line_no}") if data else None


def run_chat(llama, args) -> int:
    """The chat loop: read a message, stream the answer to stdout, report timing on stderr; 0 at the end."""
    from ..generation import ChatSession

    session = ChatSession(llama, system=args.system, **sampling_kwargs(args))
    interactive = sys.stdin.isatty()
    if interactive and feedback_on(args.quiet):
        say("chat: type a message; /reset clears the conversation, /exit quits")
    line_no = 0
    while True:
        line_no += 1
        try:
            line = read_message(line_no, interactive)
        except LlamaMinError as e:  # bad bytes: fatal when piped, a retry at the keyboard
            if not interactive:
                raise
            say(f"error: {e}")
            continue
        if line is None or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            if not args.quiet:
                say("[conversation cleared]")
            continue
        on_token, decoder = stream_printer(llama.tokenizer)
        try:
            session.ask(text, max_gen_len=args.max_new_tokens, on_token=on_token)
        except ValueError as e:  # e.g. the dialog outgrew the window: say so and let the user /reset
            say(f"error: {e}")
            continue
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        if not args.quiet:
            report(llama)
