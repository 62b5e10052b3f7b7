"""llama.cpp beside llama_min in `llama-min bench --vs-llama-cpp PATH` (standard library only: bench's flags are
checked here before torch is imported).

PATH is llama.cpp's `llama-bench`. Each measurement is one `llama-bench -m FILE -t THREADS -p P -n N -d D -r 1
-o json` run, so that llama.cpp's rounds interleave with llama_min's: the prompt test (`-p`, n_gen 0) for the
prefill row, the decode test (`-n` after a `-d` token context, n_prompt 0) for the decode row. llama-bench
prints a JSON list, one entry per test, each with "n_prompt", "n_gen", "n_depth", "avg_ts" (tokens/s),
"n_threads", "model_type", "build_commit" (as version 0.3.36 of llama-cpp-python's vendored llama.cpp prints
them). `llama-simple` beside it, when there, is llama.cpp's smallest program: load, complete a prompt, exit;
its wall time in a fresh process is set against `llama-min generate`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import LlamaMinError
from .common import UsageError

FLAG = "--vs-llama-cpp"
START_PROMPT = "Once upon a time"
START_TOKENS = 32


def check_executable(path: str) -> str:
    """PATH of --vs-llama-cpp as given, or a UsageError when it is no executable file."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{FLAG} {path}: no such file (expected llama.cpp's llama-bench program; see "
                         f"llama-min bench --help)")
    if not p.is_file() or not os.access(p, os.X_OK):
        raise UsageError(f"{FLAG} {path}: not an executable file (expected llama.cpp's llama-bench program; "
                         f"see llama-min bench --help)")
    return path


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing on stderr)"


def parse_results(stdout: str, where: str) -> list:
    """llama-bench's `-o json` output -> its list of result entries (dicts). Tolerates text around the JSON list
    (a build that logs to stdout) and a JSON-lines form (-o jsonl); anything else is a LlamaMinError."""
    text = stdout.strip()
    candidates = [text]
    if "[" in text and "]" in text:
        candidates.append(text[text.index("["): text.rindex("]") + 1])
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            data = [data]
        if isinstance(data, list) and data and all(isinstance(e, dict) for e in data):
            return data
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entries = []
            break
        if isinstance(entry, dict):
            entries.append(entry)
    if entries:
        return entries
    shown = " ".join(text.split())[:80] or "nothing"
    raise LlamaMinError(f"{where}: expected llama-bench's JSON results (-o json) on stdout, got: {shown}")


def pick(entries: list, test: str, where: str) -> dict:
    """The entry of the prompt test ("prompt": n_prompt > 0, n_gen 0) or the decode test ("decode": n_gen > 0,
    n_prompt 0), its "avg_ts" a number."""
    for e in entries:
        n_prompt, n_gen = int(e.get("n_prompt") or 0), int(e.get("n_gen") or 0)
        if (n_prompt > 0 and n_gen == 0) if test == "prompt" else (n_gen > 0 and n_prompt == 0):
            try:
                e["avg_ts"] = float(e["avg_ts"])
            except (KeyError, TypeError, ValueError):
                raise LlamaMinError(f"{where}: the {test} test's result has no tokens/s (avg_ts): {e}") from None
            return e
    raise LlamaMinError(f"{where}: no {test} test among llama-bench's results "
                        f"({[(e.get('n_prompt'), e.get('n_gen')) for e in entries]})")


def run_checked(cmd: list, what: str, model: str) -> tuple:
    """(seconds, stdout) of a fresh process running cmd; a LlamaMinError with its last stderr line if it fails."""
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
    except OSError as e:  # e.g. an executable for another machine ("Exec format error")
        raise LlamaMinError(f"{what} could not run: {e.strerror or e}") from None
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise LlamaMinError(f"{what} failed on {model} (exit {r.returncode}): {last_line(r.stderr)}")
    return seconds, r.stdout


def wall_time(cmd: list, what: str, model: str) -> float:
    """Seconds from starting cmd as a fresh process to its exit."""
    return run_checked(cmd, what, model)[0]


class LlamaBench:
    """llama.cpp as one more implementation in bench's rows: `decode` and `prefill` as llama_min's have them
    (tokens/s), each one llama-bench run with one repetition (it warms up once itself first)."""

    name = "llama.cpp"
    rows = ("decode", "prefill")

    def __init__(self, exe: str, model, threads: int):
        self.exe, self.model, self.threads = str(exe), str(model), int(threads)
        self.where = f"{FLAG} {self.exe}"
        self.info: dict = {}

    def run(self, prompt: int = 0, gen: int = 0, depth: int = 0) -> list:
        cmd = [self.exe, "-m", self.model, "-t", str(self.threads), "-p", str(prompt), "-n", str(gen),
               "-r", "1", "-o", "json"]
        if depth:
            cmd[-4:-4] = ["-d", str(depth)]
        _, out = run_checked(cmd, self.where, self.model)
        return parse_results(out, self.where)

    def probe(self) -> dict:
        """One short run of both tests before anything is measured: a file llama.cpp cannot run, or a program
        that is no llama-bench, stops here with one line. Returns what llama-bench says about itself."""
        entries = self.run(prompt=4, gen=2)
        first = pick(entries, "prompt", self.where)
        pick(entries, "decode", self.where)
        self.info = {k: first.get(k) for k in ("build_commit", "build_number", "model_type", "n_threads",
                                               "cpu_info", "backends")}
        return self.info

    def describe(self) -> str:
        i = self.info
        build = f"build {i.get('build_commit')}" if i.get("build_commit") else "build unknown"
        model = f", model '{i['model_type']}'" if i.get("model_type") else ""
        return (f"llama.cpp: {self.exe} ({build}{model}, {i.get('n_threads', self.threads)} threads; one "
                f"llama-bench run of -r 1 per round)")

    def decode(self, prompts, new_tokens) -> float:
        """tokens/s of new_tokens decoded after a context of the prompt's length (llama-bench -n N -d LEN)."""
        return pick(self.run(gen=new_tokens, depth=len(prompts[0])), "decode", self.where)["avg_ts"]

    def prefill(self, prompt) -> float:
        return pick(self.run(prompt=len(prompt)), "prompt", self.where)["avg_ts"]


def simple_beside(bench_exe: str) -> Optional[str]:
    """llama-simple in llama-bench's folder (llama-simple.exe on Windows), or None."""
    folder = Path(bench_exe).parent
    for name in ("llama-simple", "llama-simple.exe"):
        p = folder / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def start_commands(simple: str, model, threads: int) -> dict:
    """The two fresh-process commands of the "start + N tokens" row: llama-min generate and llama-simple,
    greedy, the same prompt and token count (llama-simple has no thread flag: it runs llama.cpp's default)."""
    ours = [sys.executable, "-m", "llama_min", "generate", "-m", str(model), "-p", START_PROMPT,
            "-n", str(START_TOKENS), "--temperature", "0", "-t", str(threads), "--quiet"]
    theirs = [simple, "-m", str(model), "-n", str(START_TOKENS), START_PROMPT]
    return {"llama_min": ours, "llama.cpp": theirs}
