"""`llama-min chat` in a pseudo-terminal, as a person uses it: two turns, Ctrl-C in the middle of an
answer returns to the prompt, multi-line input, /undo, /system, /save, /exit with code 0."""

import fcntl
import json
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest

from _tiny import tiny_model


def _controlling_terminal():
    """In the child: a new session whose controlling terminal is the pty, so Ctrl-C becomes SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A child process on a pty; `expect` reads until a pattern appears (or fails after a timeout)."""

    def __init__(self, argv, cwd):
        self.master, slave = pty.openpty()
        env = dict(os.environ, OMP_NUM_THREADS="1", TERM="dumb")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                     preexec_fn=_controlling_terminal)
        os.close(slave)
        self.seen, self.pos = "", 0  # everything read; where the next expect starts looking

    def expect(self, pattern: str, timeout: float = 120.0) -> str:
        """Wait for `pattern` in the output that came after the previous match."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen[self.pos:]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen so far:\n{self.seen[-2000:]}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    break
        match = re.search(pattern, self.seen[self.pos:])
        assert match, self.seen[-2000:]
        self.pos += match.end()
        return match.group(0)

    def send(self, text: str):
        os.write(self.master, text.encode())

    def interrupt(self):
        os.write(self.master, b"\x03")  # Ctrl-C, as the terminal driver delivers it (SIGINT to the group)


@pytest.mark.slow
def test_chat_in_a_terminal(tmp_path, fixtures_dir):
    from llama_min import save_checkpoint

    model = tiny_model(vocab_size=32000, max_seq_len=4096, scale=0.05)  # random: answers run to the limit
    save_checkpoint(tmp_path / "m", model.params, model.state_dict(),
                    tokenizer_files=[fixtures_dir / "mistral-tokenizer.model.v1"])
    (tmp_path / "m" / "mistral-tokenizer.model.v1").rename(tmp_path / "m" / "tokenizer.model")
    term = Terminal([sys.executable, "-m", "llama_min", "chat", "-m", str(tmp_path / "m"), "-n", "3000",
                     "-c", "4096", "--temperature", "0", "-t", "1"], cwd=tmp_path)
    term.expect(r"> $")
    term.send("hello there\n")
    # Ctrl-C as soon as the answer streams (up to 3000 random tokens; with llama_min's kernels the tiny model
    # can write them all within a second or two, so a fixed sleep could miss it): it stops, the prompt returns
    term.expect(r"hello there\r?\n[\s\S]{20}")
    term.interrupt()
    term.expect(r"answer stopped[\s\S]*> $")
    term.send('"""\nline one\nline two\n"""\n')  # one multi-line message
    term.expect(r'line two\r?\n[\s\S]*"""\r?\n[\s\S]{20}')
    term.interrupt()
    term.expect(r"answer stopped[\s\S]*> $")
    term.send("/system be brief\n")
    term.expect(r"system message: be brief[\s\S]*> $")
    term.send("/save dialog.json\n")
    term.expect(r"saved[\s\S]*> $")
    dialog = json.loads((tmp_path / "dialog.json").read_text())
    assert [m["role"] for m in dialog] == ["system", "user", "assistant", "user", "assistant"]
    assert dialog[1]["content"] == "hello there" and dialog[3]["content"] == "line one\nline two"
    term.send("/undo\n")
    term.expect(r"last exchange removed[\s\S]*> $")
    term.send("/save dialog.json\n")
    term.expect(r"saved[\s\S]*> $")
    assert [m["role"] for m in json.loads((tmp_path / "dialog.json").read_text())] == ["system", "user", "assistant"]
    term.send("/exit\n")
    assert term.proc.wait(timeout=60) == 0
    assert "Traceback" not in term.seen
