"""The interactive chat loop behind `llama-min chat` / `generate --chat`.

  messages     one line each; a line ending in "\\" continues on the next; a block between two lines of
               three double quotes (\"\"\") is one message
  Ctrl-C       while answering: stops the answer (it stays in the conversation); at the prompt: press it
               twice (or /exit, or Ctrl-D) to quit
  /system TEXT set (or with no text, remove) the system message     /undo   drop the last exchange
  /reset       forget the conversation                                /save FILE  the dialog as JSON
  /help        this list                                              /exit  quit

Line editing and history (readline) when on a terminal; piped input works line by line. Answers stream to
stdout; notes go to stderr; timing once at the end (or after every answer with --verbose).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import LlamaMinError

HELP = __doc__.split("\n\n")[1]
BLOCK = '"""'


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Input:
    """Reads messages from stdin: input() with readline on a terminal, plain lines otherwise."""

    def __init__(self, stdin=None):
        self.stdin = stdin or sys.stdin
        self.interactive = self.stdin.isatty()
        self.line_no = 0
        if self.interactive:
            _enable_readline()

    def line(self, prompt: str):
        """One line without its newline; None at end of input. Piped bytes must be UTF-8 (else one error)."""
        self.line_no += 1
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                return None
        raw = getattr(self.stdin, "buffer", None)
        if raw is None:  # a text-only stream (tests)
            line = self.stdin.readline()
        else:
            data = raw.readline()
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LlamaMinError(f"stdin line {self.line_no}: not valid UTF-8 (byte 0x{data[e.start]:02x} "
                                    f"at offset {e.start})") from None
        return None if not line else line.rstrip("\n")

    def message(self):
        """One message (joining continued lines and \"\"\" blocks); None at end of input."""
        first = self.line("> ")
        if first is None or first.strip() != BLOCK and not first.endswith("\\"):
            return first
        lines = []
        if first.strip() == BLOCK:
            while (more := self.line("... ")) is not None and more.strip() != BLOCK:
                lines.append(more)
            return "\n".join(lines)
        while first is not None and first.endswith("\\"):
            lines.append(first[:-1])
            first = self.line("... ")
        return "\n".join(lines + ([first] if first is not None else []))


def _enable_readline() -> None:
    """Arrow keys, line editing and a history file, where the readline module exists."""
    try:
        import readline
    except ImportError:
        return
    history = Path.home() / ".cache" / "llama_min" / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.exists():
            readline.read_history_file(history)
        import atexit

        atexit.register(lambda: _save_history(readline, history))
    except OSError:
        pass  # no history, still line editing


def _save_history(readline, path) -> None:
    try:
        readline.set_history_length(1000)
        readline.write_history_file(path)
    except OSError:
        pass


def run_command(session, text: str) -> bool:
    """Carry out a /command; False for /exit."""
    name, _, arg = text.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        _note("[conversation cleared]")
    elif name == "/undo":
        _note("[last exchange removed]" if session.undo() else "[nothing to undo]")
    elif name == "/system":
        session.set_system(arg.strip() or None)
        _note(f"[system message: {arg.strip()}]" if arg.strip() else "[system message removed]")
    elif name == "/save":
        if not arg.strip():
            _note("usage: /save FILE")
        else:
            session.save(arg.strip())
            _note(f"[dialog saved to {arg.strip()}]")
    elif name == "/help":
        _note(HELP)
    else:
        _note(f"unknown command {name}; /help lists them")
    return True


class _Timing:
    """Tokens and seconds over the whole chat, for one closing line (or one per answer, verbose)."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0

    def add(self, stats, verbose: bool):
        self.tokens += stats.new_tokens
        self.seconds += stats.decode_s
        if verbose and stats.decode_s > 0:
            _note(f"[{stats.new_tokens} tokens at {stats.new_tokens / stats.decode_s:.1f} tok/s]")

    def close(self):
        if self.tokens and self.seconds > 0:
            _note(f"[chat: {self.tokens} tokens generated at {self.tokens / self.seconds:.1f} tok/s]")


def answer(session, text: str, max_new_tokens: int, prefill: str = "", quiet: bool = False) -> None:
    """Stream one answer to stdout (starting with `prefill`); Ctrl-C stops it (what was said is kept). An answer
    cut by the token limit or the window says so on stderr (unless quiet), with the flag that moves it."""
    decoder = session.llama.tokenizer.stream_decoder()
    sys.stdout.write(prefill)

    def show(token_id: int):
        sys.stdout.write(decoder.push(token_id))
        sys.stdout.flush()

    try:
        session.ask(text, max_gen_len=max_new_tokens, on_token=show, prefill=prefill)
    except KeyboardInterrupt:
        sys.stdout.write(decoder.flush() + "\n")
        _note("[answer stopped]")
        return
    except LlamaMinError as e:
        _note(f"error: {e}")
        return
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    reason = "" if quiet else session.llama.stats.stop_reasons[0]
    if reason == "max-new-tokens":
        _note(f"[answer cut at the token limit ({max_new_tokens} tokens): raise it with -n/--max-new-tokens]")
    elif reason == "window full":
        _note(f"[the conversation filled the context window ({session.llama.max_seq_len} tokens): /reset to "
              "start over, or raise -c/--max-seq-len]")


def chat_loop(session, max_new_tokens: int, verbose: bool = False, quiet: bool = False, stdin=None,
              prefill: str = "") -> int:
    """Run the chat until /exit, end of input, or two Ctrl-C in a row at the prompt. Returns 0."""
    from ..parallel.group import read_on_rank0

    reader, timing, interrupts = _Input(stdin), _Timing(), 0
    if reader.interactive and not quiet:
        _note("chat: type a message (/help for commands; Ctrl-C stops an answer; Ctrl-C twice quits)")
    while True:
        try:
            text = read_on_rank0(reader.message)  # under torchrun rank 0 reads, every rank gets the message
        except LlamaMinError as e:  # bad bytes at the keyboard: say so and go on (piped: fatal)
            if not reader.interactive:
                raise
            _note(f"error: {e}")
            continue
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 2:
                break
            _note("\n(Ctrl-C again, /exit or Ctrl-D to quit)")
            continue
        interrupts = 0
        if text is None:
            break
        if not text.strip():
            continue
        if text.strip().startswith("/") and "\n" not in text.strip():
            if not run_command(session, text.strip()):
                break
            continue
        start = time.perf_counter()
        answer(session, text.strip(), max_new_tokens, prefill, quiet)
        session.llama.stats.decode_s = session.llama.stats.decode_s or time.perf_counter() - start
        timing.add(session.llama.stats, verbose and not quiet)
    if not quiet:
        timing.close()
    return 0
