"""The `llama-min` command (also `python -m llama_min`): one program, one subcommand per task.

  llama-min generate   complete a prompt, streamed (-p TEXT), or chat (--chat)
  llama-min chat       multi-turn chat on stdin (= generate --chat)
  llama-min train      train from scratch or fine-tune (fully or LoRA) on .txt / .jsonl
  llama-min convert    rewrite a checkpoint in llama_min's format or as a Hugging Face folder
  llama-min eval       perplexity of a checkpoint on a text file
  llama-min bench      decode / prefill speed vs transformers and vs the memory-bandwidth ceiling
  llama-min inspect    attention, RoPE pair use and the logit lens of a real model, as pictures
  llama-min serve      an OpenAI-compatible HTTP server (continuous batching, prompt reuse)

Each subcommand is a module here with `main(argv=None) -> int`; scripts/*.py call the same functions.
Exit codes are the same everywhere (llama_min/cli/common.py): 0 done, 2 a user error (one `error:` line),
1 a machine failure, 130 Ctrl-C.

Starting is cheap: no module here imports torch or the model code at import time (each command imports them
once its flags are checked), so `--help` answers at once and Ctrl-C is one line from the first instant.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

from .common import quit_on_ctrl_c, run_as_program

signal.signal(signal.SIGINT, quit_on_ctrl_c)  # until a command runs (run_main): Ctrl-C = one line, exit 130

from ..formats import formats_sentence  # noqa: E402 - after the handler: every import from here on can be interrupted
from . import bench, chat, convert, generate, inspect, serve, train  # noqa: E402
from . import eval as evaluate  # noqa: E402
from .common import USER_ERROR, UsageError, run_main  # noqa: E402

COMMANDS = {  # name -> (module, one-line summary)
    "generate": (generate, "complete a prompt, streamed to stdout (-p TEXT), or chat (--chat)"),
    "chat": (chat, "multi-turn chat on stdin; the KV cache is kept across turns (= generate --chat)"),
    "train": (train, "train from scratch (--config) or fine-tune (--init), fully or with LoRA"),
    "convert": (convert, "rewrite a checkpoint as a llama_min folder, a Hugging Face folder or a GGUF file"),
    "eval": (evaluate, "perplexity of a checkpoint on a text file"),
    "bench": (bench, "decode / prefill speed vs transformers and vs the memory-bandwidth ceiling"),
    "inspect": (inspect, "attention, RoPE pair use and the logit lens of a prompt: pictures + inspect.npz"),
    "serve": (serve, "an OpenAI-compatible HTTP server: chat and completions, many clients batched together"),
}


def usage(prog: str) -> str:
    lines = [f"usage: {prog} <command> [options]", "",
             "A minimal, exact Llama-family implementation: run, chat with, train, convert and measure "
             "Llama checkpoints (Meta, Hugging Face, GGUF, llama_min).", "", "commands:"]
    lines += [f"  {name:9s} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "A checkpoint (-m/--ckpt) can be: " + formats_sentence() + ".",
              "", f"`{prog} <command> --help` explains a command's options. --debug shows tracebacks.",
              f"Examples:\n  {prog} generate -p \"The capital of France is\" --temperature 0\n"
              f"  {prog} chat --system \"You answer in one sentence.\"\n"
              f"  {prog} train --config tiny --data notes.txt --out runs/tiny"]
    return "\n".join(lines)


def program() -> None:
    """The installed `llama-min` command: main() as the whole process (common.run_as_program)."""
    run_as_program(main)


def main(argv: Optional[list] = None, prog: str = "llama-min") -> int:
    """Run `prog <command> ARGS...`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = [a for a in argv[:1] if a == "--debug"]  # `llama-min --debug generate ...` works too
    argv = argv[len(debug):]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else USER_ERROR
    if argv[0] == "--version":
        print(f"llama_min {version()}")
        return 0
    if argv[0] not in COMMANDS:
        return run_main(lambda _: _unknown(argv[0], prog), [])
    module = COMMANDS[argv[0]][0]
    return module.main(argv[1:] + debug, prog=f"{prog} {argv[0]}")


def version() -> str:
    """The installed version (from the package's metadata; the package's own __version__ when not installed).
    Read this way, `python -m llama_min` also works from the folder that holds a clone named llama_min, where
    Python takes the clone's folder for the package itself and its __init__ is never run."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("llama_min")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _unknown(name: str, prog: str):
    """A mistyped command: 'did you mean' the closest one (difflib; argparse has its own only from 3.14)."""
    import difflib

    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(f"unknown command '{name}': {hint}expected one of {', '.join(COMMANDS)} (see {prog} --help)")
