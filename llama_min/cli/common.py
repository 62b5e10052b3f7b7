"""What every command shares: one exit-code rule, one-line argument errors, checks made before loading.

Exit codes (`run_main`):

  0    done
  2    the user's mistake: LlamaMinError, ValueError, FileNotFoundError, a bad flag. One line on stderr,
       `error: <message>`, naming the flag or file and what was expected
  1    the machine's fault: EnvironmentFailure, OSError (read-only folder, disk full, permission denied,
       no network), out of memory, or an unexpected error (a bug: rerun with --debug for the traceback)
  130  Ctrl-C (one line)
  141  stdout closed early (`llama-min generate ... | head -c 10`): no message, like any Unix tool

`--debug` anywhere on the command line prints the traceback above the error line.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import EnvironmentFailure, LlamaMinError
from ..formats import formats_sentence

USER_ERROR, ENV_FAILURE, INTERRUPTED, BROKEN_PIPE = 2, 1, 130, 141


class UsageError(LlamaMinError):
    """A bad command line (unknown flag, missing value, value out of range)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag raises UsageError instead of printing usage and exiting."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if sys.version_info >= (3, 14):  # "maybe you meant ...?" for a mistyped choice
            kwargs.setdefault("suggest_on_error", True)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the Python traceback of an error")

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def quit_on_ctrl_c(signum, frame) -> None:
    """The SIGINT handler while the program starts (cli/__init__ installs it first): one line, exit 130."""
    os.write(2, b"\ninterrupted\n")
    os._exit(INTERRUPTED)


def run_as_program(main: Callable[[], int]) -> None:
    """Run `main()` as the whole process (`llama-min`, `python -m llama_min`) and exit with its code, without the
    interpreter's teardown.

    Once main returns, Python would free every module and object one by one. With torch imported that takes
    0.35-0.47 s (measured on this project's 2-core machine: `import torch` alone, then exit), a fifth of a
    32-token `generate`. Here the atexit handlers still run (library code finishes there: a layout still
    being written, temp folders' finalizers), the standard streams are flushed, and then os._exit ends the
    process: only the freeing of memory the OS takes back anyway is skipped. Every file llama_min writes is
    closed before main returns (files.atomic_write and with-blocks)."""
    code = [1]

    def finish():  # registered first, so run last: atexit runs its handlers in reverse order
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe, a closed stream: nothing more can be said
                pass
        os._exit(code[0])

    atexit.register(finish)
    code[0] = main()
    sys.exit(code[0])


def run_main(body: Callable[[list], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run `body(argv)` under the exit-code rule above; returns the exit code (never raises, never exits).

    From here on Ctrl-C is Python's KeyboardInterrupt again, so a command can catch it (chat stops an
    answer, train saves a checkpoint); one it does not catch ends as the `interrupted` line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = body(argv)
        sys.stdout.flush()  # a closed pipe shows up here at the latest
        finish_layout_writes(quiet="--quiet" in argv)
        return 0 if code is None else int(code)
    except SystemExit as e:  # --help, --version, or a library calling sys.exit
        return _system_exit_code(e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        layouts = sys.modules.get("llama_min.runtime.layout_cache")
        if layouts is not None:
            layouts.cancel_writes()
        return INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except BaseException as e:  # noqa: BLE001 - every error ends as one line and a code
        code, message = classify(e, debug)
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return code


def finish_layout_writes(quiet: bool) -> None:
    """Wait for the converted layout a packed GGUF load is still writing to the cache (runtime/layout_cache.py),
    saying why on stderr: the next start maps it instead of converting. Nothing when no load wrote one."""
    layouts = sys.modules.get("llama_min.runtime.layout_cache")
    if layouts is None or not layouts.writing():
        return
    if not quiet:
        print(f"caching the converted layout ({layouts.writing() / 1e9:.2f} GB, once) so the next start maps it; "
              "Ctrl-C skips it, --no-layout-cache never writes it", file=sys.stderr, flush=True)
    layouts.wait_for_writes()


def classify(e: BaseException, debug: bool = False) -> tuple:
    """(exit code, one-line message) for an exception, by the rule in this module's docstring."""
    if isinstance(e, EnvironmentFailure):
        return ENV_FAILURE, _one_line(e)
    if isinstance(e, (LlamaMinError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return USER_ERROR, _one_line(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return ENV_FAILURE, f"out of memory ({_one_line(e) or 'no details'})"
    if isinstance(e, OSError):
        return ENV_FAILURE, _os_message(e)
    hint = "" if debug else " (unexpected: run again with --debug for the traceback)"
    return ENV_FAILURE, f"{type(e).__name__}: {_one_line(e)}{hint}"


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return _os_message(e)
    return " ".join(str(e).split())


def _os_message(e: OSError) -> str:
    """'<file>: <reason>' (e.g. 'runs/x: Read-only file system') instead of '[Errno 30] ...'."""
    if e.strerror:
        return e.strerror if e.filename is None else f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def _system_exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(f"error: {e.code}", file=sys.stderr)  # sys.exit("message")
    return USER_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests)
        pass


# ------------------------------------------------------------------------------------------------
# Checks made before anything slow happens
# ------------------------------------------------------------------------------------------------


def check_number(flag: str, value, low=None, high=None, low_open=False, integer=False) -> None:
    """A flag's value is finite and inside [low, high] ((low, high] with low_open); else UsageError."""
    if value is None:
        return
    bounds = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    what = "an integer" if integer else "a number"
    ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or value <= high)
    if not ok:
        raise UsageError(f"{flag} {value}: expected {what} in {bounds}")


def check_utf8(flag: str, text: Optional[str]) -> None:
    """Text from argv is valid UTF-8 (Python keeps undecodable argv bytes as lone surrogates)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        shown = f"byte 0x{byte:02x}" if byte is not None else f"character U+{ord(text[e.start]):04X}"
        raise UsageError(f"{flag}: not valid UTF-8 ({shown} at character {e.start})") from None


def decode_utf8(data: bytes, where: str) -> str:
    """bytes -> str, or a LlamaMinError naming `where` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamaMinError(f"{where}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def stdin_bytes():
    """The binary stream under sys.stdin (tests may replace sys.stdin with a text-only object)."""
    return getattr(sys.stdin, "buffer", None)


def read_stdin_text() -> str:
    """All of stdin as text, strictly UTF-8."""
    raw = stdin_bytes()
    return decode_utf8(raw.read(), "stdin") if raw is not None else sys.stdin.read()


def check_device(name: Optional[str]) -> None:
    """`--device` names a device this machine has (cpu, cuda, cuda:N, mps); else UsageError."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: expected cpu, cuda, cuda:N or mps")




def checkpoint_format(path, flag: str = "--ckpt") -> str:
    """The checkpoint format of `path` ('gguf' | 'own' | 'meta' | 'hf'), or a LlamaMinError saying what was expected."""
    from ..checkpoint import detect_format

    path = Path(path)
    if not path.exists():
        raise LlamaMinError(f"{flag} {path}: no such file or directory")
    try:
        return detect_format(path)
    except (LlamaMinError, ValueError, OSError):
        raise LlamaMinError(f"{flag} {path}: not a checkpoint: expected {formats_sentence()}") from None


def local_checkpoint(ckpt: Optional[str], flag: str = "--ckpt") -> Optional[str]:
    """A --ckpt value as a local path (a hub id or HF cache folder -> its local snapshot), checked to be a
    checkpoint (`checkpoint_format`); None (the default model) stays None."""
    if ckpt is None:
        return None
    from ..files.hub import resolve_checkpoint

    path = str(resolve_checkpoint(ckpt))
    checkpoint_format(path, flag)
    return path


def human_size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return ""


def checkpoint_size(path) -> int:
    """Bytes of a checkpoint file, or of the files directly inside a checkpoint folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def feedback_on(quiet: bool = False) -> bool:
    """Progress messages go to stderr only when someone watches it: a terminal, and no --quiet."""
    return not quiet and sys.stderr.isatty()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
