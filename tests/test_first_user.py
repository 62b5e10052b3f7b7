"""What a first user meets, driven through the installed command in a subprocess: `--help` without torch,
Ctrl-C from the first instant, `python -m llama_min` beside a clone, one-line errors, eval reading the file as
stored, chat saying why an answer stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_min.cli import COMMANDS

ENV = dict(os.environ, OMP_NUM_THREADS="1")
LLAMA_MIN = shutil.which("llama-min")
needs_command = pytest.mark.skipif(LLAMA_MIN is None and os.environ.get("CI", "").lower() != "true",
                                   reason="the llama-min command is not installed (pip install -e .)")


def run(*argv, stdin=None, cwd=None, timeout=300):
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=timeout)


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_does_not_import_torch(argv):
    """Every help answers from argparse alone: neither torch nor the model code is imported."""
    code = ("import sys\nfrom llama_min.cli import main\ncode = main(%r)\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'llama_min.model')))\n"
            "print('IMPORTED', heavy, file=sys.stderr)\nsys.exit(code)\n" % argv)
    r = run(sys.executable, "-c", code)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "IMPORTED []"


@needs_command
@pytest.mark.parametrize("delay", [0.2, 1.0])
def test_ctrl_c_while_chat_starts_is_one_line_exit_130(delay):
    """SIGINT 0.2 s after start (Python is importing) and 1 s after (torch or the model is loading)."""
    proc = subprocess.Popen([LLAMA_MIN, "chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err


@needs_command
def test_mistyped_command_gets_did_you_mean():
    r = run(LLAMA_MIN, "genrate", "-p", "hi")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: unknown command 'genrate': did you mean 'generate'? expected one of "
                                     f"{', '.join(COMMANDS)} (see llama-min --help)"]


@needs_command
def test_argparse_errors_are_one_line_in_every_command():
    for argv in (["eval"], ["eval", "--data"], ["bench", "--rounds", "x"], ["generate", "--frobnicate"],
                 ["convert", "only-src"]):
        r = run(LLAMA_MIN, *argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, r.stderr)


def test_python_m_llama_min_from_the_folder_that_holds_the_clone(tmp_path):
    """A clone named llama_min is a folder without __init__.py: from its parent folder, Python takes it for the
    package (a namespace package) before the installed one. The command still runs."""
    clone = tmp_path / "llama_min"
    clone.mkdir()
    (clone / "README.md").write_text("a clone\n")
    r = run(sys.executable, "-m", "llama_min", "--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("llama_min "), r.stderr
    r = run(sys.executable, "-m", "llama_min", "eval", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--data" in r.stdout, r.stderr


@needs_command
@pytest.mark.assets
def test_eval_scores_crlf_as_stored(smollm2_path, tmp_path):
    """A CRLF copy of a text has other tokens than its LF copy (llama-perplexity reads bytes: so do we)."""
    text = "It was the best of times,\nit was the worst of times,\nit was the age of wisdom.\n" * 12
    (tmp_path / "lf.txt").write_bytes(text.encode())
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    results = {}
    for name in ("lf", "crlf"):
        r = run(LLAMA_MIN, "eval", "-m", str(smollm2_path), "--data", str(tmp_path / f"{name}.txt"), "-c", "64",
                "--max-windows", "1", "--json", "-t", "1")
        assert r.returncode == 0, r.stderr
        results[name] = json.loads(r.stdout)
        err = r.stderr.strip().splitlines()
        assert err[0].startswith(f"loading {smollm2_path} (GGUF, ") and "\r" not in r.stderr  # no bar in a log
        assert err[-1] == f"[stopped: --max-windows 1 of the text's {results[name]['all_windows']} windows]"
    assert results["crlf"]["text_tokens"] > results["lf"]["text_tokens"]
    assert results["crlf"]["perplexity"] != results["lf"]["perplexity"]


@needs_command
@pytest.mark.assets
def test_chat_says_when_an_answer_hit_the_token_limit(smollm2_path):
    r = run(LLAMA_MIN, "chat", "-m", str(smollm2_path), "-n", "4", "--temperature", "0", "-t", "1",
            stdin="Write a long story about a dragon.\n")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert "[answer cut at the token limit (4 tokens): raise it with -n/--max-new-tokens]" in r.stderr.splitlines()


def test_building_on_the_meta_device_skips_the_random_fill():
    """checkpoint.shapes_only(): modules built for a checkpoint's tensors get no random init, so torch's first
    meta normal_ (which imports some 800 modules, sympy among them: ~1 s and ~65 MB at start-up) never runs.
    The control without it shows the check can fail."""
    code = ("import sys, torch\nfrom llama_min.checkpoint import shapes_only\n"
            "with {ctx}:\n    e = torch.nn.Embedding(1000, 64)\n"
            "print(e.weight.is_meta, 'sympy' in sys.modules)\n")
    fast = run(sys.executable, "-c", code.format(ctx="shapes_only()"))
    slow = run(sys.executable, "-c", code.format(ctx="torch.device('meta')"))
    assert fast.stdout.split() == ["True", "False"], fast.stderr
    assert slow.stdout.split() == ["True", "True"], slow.stderr
