"""The `llama-min` command: dispatch, short flags, one exit-code rule, one-line errors, stdin/stdout edge cases.

Most tests run the command in this process (`llama_min.cli.main(argv)` with capsys); the ones about the real
process (argv bytes, a closed pipe, `python -m llama_min`) run a subprocess on this checkout.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import textwrap
import sys
from pathlib import Path

import pytest
import torch

from llama_min import ModelArgs, Transformer, save_checkpoint
from llama_min.cli import COMMANDS, main
from llama_min.cli import common
from llama_min.cli.generate import build_parser
from llama_min.errors import EnvironmentFailure, LlamaMinError

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
EOS = 2  # the Mistral tokenizer's </s>: the only stop id of a plain completion


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, fixtures_dir) -> Path:
    """A random llama_min checkpoint (dim 32) with the Mistral sentencepiece tokenizer beside it.

    The output row of </s> is zero, so greedy decoding (its logit 0 against 32k random ones) does not stop early.
    """
    path = tmp_path_factory.mktemp("cli") / "tiny"
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, hidden_dim=64, max_seq_len=4096)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0, 0.5)
        model.output.weight[EOS] = 0
    save_checkpoint(path, args, model.state_dict())
    shutil.copyfile(fixtures_dir / "mistral-tokenizer.model.v1", path / "tokenizer.model")
    return path


def run_cli(capsys, *argv) -> tuple:
    """(exit code, stdout, stderr lines) of `llama-min ARGV` run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def assert_one_error_line(err: list, *parts: str) -> None:
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0], err
    for part in parts:
        assert part in err[0], (part, err[0])


# ------------------------------------------------------------------------------------------------ dispatch


def test_python_m_llama_min_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "llama_min", "--help"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("usage: python -m llama_min <command>")
    for name in ("generate", "chat", "train", "convert", "eval", "bench"):
        assert f"\n  {name} " in r.stdout


def test_unknown_command_is_one_line_exit_2(capsys):
    code, out, err = run_cli(capsys, "genrate", "-p", "x")
    assert code == 2 and out == ""
    assert_one_error_line(err, "unknown command 'genrate'", "generate, chat, train, convert, eval, bench")


def test_no_command_prints_usage_exit_2(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and out == "" and err[0] == "usage: llama-min <command> [options]"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(capsys, name):
    code, out, _ = run_cli(capsys, name, "--help")
    assert code == 0 and "usage:" in out and "--debug" in out or name in ("train", "eval")
    assert "--data" in out if name == "train" else "--" in out


def test_debug_before_the_command_reaches_it(capsys):
    code, out, err = run_cli(capsys, "--debug", "train", "--help")  # train's own parser never sees --debug
    assert code == 0 and "--data" in out
    code, _, err = run_cli(capsys, "--debug", "generate", "-p", "x", "--min-p", "2")
    assert code == 2 and err[0] == "Traceback (most recent call last):" and err[-1].startswith("error: --min-p 2.0")


def test_short_flags_mean_the_long_ones():
    short = build_parser().parse_args("-m ck -p hi -n 5 -c 64 -t 2 -s 7".split())
    long = build_parser().parse_args("--ckpt ck --prompt hi --max-new-tokens 5 --max-seq-len 64 --threads 2 "
                                     "--seed 7".split())
    assert vars(short) == vars(long)
    assert (long.ckpt, long.prompt, long.max_new_tokens, long.max_seq_len, long.threads, long.seed) == \
        ("ck", "hi", 5, 64, 2, 7)


# ------------------------------------------------------------------------------------------------ bad input


BAD_FLAGS = {
    "min-p": (["--min-p", "2"], "--min-p 2.0: expected a number in [0, 1]"),
    "temperature-nan": (["--temperature", "nan"], "--temperature nan: expected a number in [0, inf]"),
    "temperature-neg": (["--temperature", "-1"], "--temperature -1.0: expected a number in [0, inf]"),
    "top-p": (["--top-p", "0"], "--top-p 0.0: expected a number in (0, 1]"),
    "top-k": (["--top-k", "0"], "--top-k 0: expected an integer in [1, inf]"),
    "max-seq-len": (["-c", "-5"], "--max-seq-len -5: expected an integer in [2, inf]"),
    "max-new-tokens": (["-n", "0"], "--max-new-tokens 0: expected an integer in [1, inf]"),
    "threads": (["-t", "0"], "--threads 0: expected an integer in [1, inf]"),
    "rep-penalty": (["--repetition-penalty", "inf"], "--repetition-penalty inf: expected a number in (0, inf]"),
    "not-int": (["-n", "ten"], "argument -n/--max-new-tokens: invalid int value: 'ten' (see llama-min generate"),
    "unknown-flag": (["--colour"], "unrecognized arguments: --colour"),
    "device": (["--device", "tpu"], "--device tpu: expected cpu, cuda, cuda:N or mps"),
    "no-prompt": ([], "give --prompt TEXT (or - for stdin), or --chat"),
    "prompt-utf8": (["--system", "ok", "-p", "caf\udcc3("], "--prompt: not valid UTF-8 (byte 0xc3 at character 3)"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_exit_2_with_one_line_before_loading(capsys, monkeypatch, case):
    import llama_min.generation

    monkeypatch.setattr(llama_min.generation.Llama, "build", _must_not_load)
    argv, message = BAD_FLAGS[case]
    if case != "no-prompt" and "-p" not in argv:
        argv = ["-p", "hi", *argv]
    code, out, err = run_cli(capsys, "generate", *argv)
    assert code == 2 and out == ""
    assert_one_error_line(err, message)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded although a flag was bad")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys):
    code, _, err = run_cli(capsys, "generate", "-p", "hi", "--device", "cuda")
    assert code == 2
    assert_one_error_line(err, "--device cuda: CUDA is not available", "use --device cpu")


def test_device_mps_where_absent(capsys):
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        pytest.skip("this machine has MPS")
    code, _, err = run_cli(capsys, "chat", "--device", "mps")
    assert code == 2
    assert_one_error_line(err, "--device mps: MPS (Apple GPU) is not available here")


@pytest.mark.parametrize("what", ["text-file", "empty-dir", "missing"])
def test_ckpt_that_is_not_a_checkpoint(capsys, tmp_path, what):
    path = tmp_path / what
    if what == "text-file":
        path.write_text("hello")
    elif what == "empty-dir":
        path.mkdir()
    code, _, err = run_cli(capsys, "generate", "-m", path, "-p", "hi")
    assert code == 2
    if what == "missing":
        assert_one_error_line(err, f"--ckpt {path}: no such file or directory")
    else:
        assert_one_error_line(err, f"--ckpt {path}: not a checkpoint: expected GGUF (a .gguf file",
                              "llama2.c (", "Hugging Face (", "Meta (", "llama_min (")


def test_prompt_with_invalid_utf8_bytes_in_argv(tiny_ckpt):
    """Real argv bytes: Python keeps the undecodable byte as a surrogate, and the command refuses it."""
    r = subprocess.run([sys.executable, "-m", "llama_min", "generate", "-m", str(tiny_ckpt), "-p".encode(),
                        b"caf\xc3(", "-n", "2"], capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().strip() == "error: --prompt: not valid UTF-8 (byte 0xc3 at character 3)"


def test_prompt_from_stdin_must_be_utf8(capsys, monkeypatch, tiny_ckpt):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    code, out, err = run_cli(capsys, "generate", "-m", tiny_ckpt, "-p", "-")
    assert code == 2 and out == ""
    assert_one_error_line(err, "stdin: not valid UTF-8 (byte 0xe9 at offset 3)")


def test_chat_stops_at_invalid_utf8_on_stdin(capsys, monkeypatch, tiny_ckpt):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello\n\xff\xfe\nnever read\n")))
    code, out, err = run_cli(capsys, "chat", "-m", tiny_ckpt, "-n", "3", "--temperature", "0", "--quiet")
    assert code == 2 and out.count("\n") >= 1  # the first message was answered
    assert err == ["error: stdin line 2: not valid UTF-8 (byte 0xff at offset 0)"]


# ------------------------------------------------------------------------------------------------ running


def test_generate_streams_and_reports(capsys, tiny_ckpt):
    code, out, err = run_cli(capsys, "generate", "-m", tiny_ckpt, "-p", "Hello", "-n", "5", "--temperature", "0",
                             "-t", "1")
    assert code == 0 and out.endswith("\n") and len(out) > 1
    assert err[0].startswith(f"loading {tiny_ckpt} (llama_min, ") and err[0].endswith(" MB)...")
    assert err[1] == "[stopped: max-new-tokens (-n 5)]"  # why it stopped, then the timing
    assert len(err) == 3 and "generated 5 tok at" in err[2]


def test_reference_runs_model_py_and_verbose_names_the_step(capsys, monkeypatch, tiny_ckpt):
    """--reference decodes through model.py's Transformer.forward (every step) and writes the greedy text the
    optimized run writes; --verbose names the step each run chose; --reference refuses --quantize."""
    from llama_min.model import Transformer

    calls, real = [], Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **kw: (calls.append(1), real(self, *a, **kw))[1])
    flags = ("generate", "-m", tiny_ckpt, "-p", "Hello", "-n", "5", "--temperature", "0", "-t", "1", "--verbose")
    code, reference_out, err = run_cli(capsys, *flags, "--reference")
    assert code == 0 and err[1].startswith("decode step: reference (the model's own forward")
    assert len(calls) == 5  # the prompt, then one call per new token after the first
    code, out, err = run_cli(capsys, *flags)
    assert code == 0 and err[1].startswith("decode step: ") and out == reference_out
    code, _, err = run_cli(capsys, *flags, "--reference", "--quantize", "int8")
    assert code == 2 and err == ["error: --reference runs model.py's own layers; it does not take --quantize"]


def test_loading_line_names_the_format_unless_quiet(capsys, tiny_ckpt):
    """Said in a log file too (it explains the silence while loading); --quiet silences it."""
    size = sum(f.stat().st_size for f in tiny_ckpt.iterdir()) / 1e6
    code, _, err = run_cli(capsys, "generate", "-m", tiny_ckpt, "-p", "Hello", "-n", "2")
    assert code == 0 and err[0] == f"loading {tiny_ckpt} (llama_min, {size:.1f} MB)..."
    code, _, err = run_cli(capsys, "generate", "-m", tiny_ckpt, "-p", "Hello", "-n", "2", "--quiet")
    assert code == 0 and err == []


def test_chat_is_generate_chat(capsys, monkeypatch, tiny_ckpt):
    answers = []
    for argv in (["chat"], ["generate", "--chat"]):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hi\n/reset\nHi again\n")))
        code, out, err = run_cli(capsys, *argv, "-m", tiny_ckpt, "-n", "4", "--temperature", "0")
        assert code == 0 and "[conversation cleared]" in err
        assert err[-1] == "[chat: 8 tokens generated at " + err[-1].split(" at ")[1]  # timing once, at the end
        assert len(out.splitlines()) == 2  # two answers
        answers.append(out)
    assert answers[0] == answers[1] and answers[0]


@pytest.mark.slow
def test_broken_pipe_exits_quietly(tiny_ckpt):
    """`llama-min generate ... | head -c 10`: no traceback, no 'Exception ignored' at exit."""
    proc = subprocess.Popen([sys.executable, "-m", "llama_min", "generate", "-m", str(tiny_ckpt), "-p", "Hi",
                             "-n", "3000", "-c", "4096", "--temperature", "0", "-t", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    head = proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert len(head) == 10
    assert code == common.BROKEN_PIPE and err.startswith(f"loading {tiny_ckpt} ") and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize("exc, code, message", [
    (LlamaMinError("data.txt:3: not valid UTF-8"), 2, "data.txt:3: not valid UTF-8"),
    (ValueError("top_p must be in (0, 1], got 2"), 2, "top_p must be in (0, 1], got 2"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.gguf"), 2, "x.gguf: No such file or directory"),
    (EnvironmentFailure("no network: pip download failed"), 1, "no network: pip download failed"),
    (OSError(errno.EROFS, "Read-only file system", "runs/x"), 1, "runs/x: Read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1, "/root/x: Permission denied"),
    (RuntimeError("boom"), 1, "RuntimeError: boom (unexpected: run again with --debug for the traceback)"),
])
def test_exit_code_rule(capsys, exc, code, message):
    def body(argv):
        raise exc

    assert common.run_main(body, []) == code
    assert capsys.readouterr().err == f"error: {message}\n"


def test_debug_shows_the_traceback(capsys):
    def body(argv):
        raise LlamaMinError("bad key")

    assert common.run_main(body, ["--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith("error: bad key\n")


def test_ctrl_c_is_one_line_130(capsys):
    def body(argv):
        raise KeyboardInterrupt

    assert common.run_main(body, []) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_broken_pipe_in_process(capsys, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def body(argv):
        sys.stdout.write("text")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert common.run_main(body, []) == common.BROKEN_PIPE
    assert capsys.readouterr().err == ""


def test_run_as_program_keeps_the_exit_code_the_output_and_the_atexit_handlers(tmp_path):
    """The program exits through os._exit, skipping the interpreter's teardown (common.run_as_program): its exit
    code, everything it printed (100 kB to a pipe, not newline-terminated) and the atexit handlers registered
    while it ran (how a layout still being written is finished) all survive."""
    marker = tmp_path / "handler-ran"
    code = textwrap.dedent(f"""
        import atexit, sys
        from llama_min.cli.common import run_as_program

        def main():
            atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
            sys.stdout.write("x" * 100000)
            sys.stderr.write("to stderr")
            return 3

        run_as_program(main)
        print("never here")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 3 and r.stdout == "x" * 100000 and r.stderr == "to stderr"
    assert marker.read_text() == "yes"
