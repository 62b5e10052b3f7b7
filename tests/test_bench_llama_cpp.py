"""`llama-min bench --vs-llama-cpp PATH`: llama.cpp's llama-bench (and llama-simple beside it) on the same GGUF
file, interleaved with llama_min's measurements. The llama.cpp programs here are small fakes written by the
tests (known tokens/s, a log of every run), so no test needs llama.cpp or depends on timing: the printed ratios
are checked against the printed figures, the order of the runs against the log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_min.cli import llama_cpp, main, speed

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TS, DECODE_TS = 500.0, 125.0  # what the fake llama-bench reports

FAKE_BENCH = r'''
import json, sys
args = sys.argv[1:]
opt = {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}
p, n, d = int(opt.get("-p", 0)), int(opt.get("-n", 0)), int(opt.get("-d", 0))
with open(LOG, "a") as f:
    f.write(f"cpp p={p} n={n} d={d} t={opt['-t']} r={opt['-r']} o={opt['-o']} m={opt['-m']}\n")
if MODE == "fail":
    print("[")
    print("llama_model_load: error loading model: tensor data is not within the file bounds", file=sys.stderr)
    print(f"llama_bench: error: failed to load model '{opt['-m']}'", file=sys.stderr)
    sys.exit(1)
if MODE == "not-json":
    print("| model | size | params | backend | threads | test | t/s |")
    sys.exit(0)
common = {"build_commit": "fake123", "build_number": 1, "cpu_info": "fake", "backends": "CPU",
          "model_filename": opt["-m"], "model_type": "llama ?B Q8_0", "n_threads": int(opt["-t"]), "n_depth": d,
          "stddev_ns": 0, "stddev_ts": 0.0}
out = []
if p:
    out.append(dict(common, n_prompt=p, n_gen=0, avg_ns=int(p / PROMPT_TS * 1e9), avg_ts=PROMPT_TS,
                    samples_ts=[PROMPT_TS]))
if n:
    out.append(dict(common, n_prompt=0, n_gen=n, avg_ns=int(n / DECODE_TS * 1e9), avg_ts=DECODE_TS,
                    samples_ts=[DECODE_TS]))
print(json.dumps(out, indent=2))
'''

FAKE_SIMPLE = r'''
import sys, time
with open(LOG, "a") as f:
    f.write(f"simple {' '.join(sys.argv[1:3])} {' '.join(sys.argv[3:5])} prompt={sys.argv[5]!r}\n")
if MODE == "fail":
    print("llama_model_load: error loading model", file=sys.stderr)
    print("main: error: unable to load model", file=sys.stderr)
    sys.exit(1)
time.sleep(0.3)  # a known floor, so the printed seconds (3 decimals) hold the ratio to 1%
print("Once upon a time there was a fake.")
'''


def write_program(folder: Path, name: str, body: str, log: Path, mode: str = "ok") -> Path:
    """An executable `name` in folder: a shell wrapper running the Python body (no shebang length limits)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"{name}.py"
    script.write_text(f"LOG = {str(log)!r}\nMODE = {mode!r}\nPROMPT_TS, DECODE_TS = {PROMPT_TS}, {DECODE_TS}\n"
                      + body)
    exe = folder / name
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(0o755)
    return exe


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, fixtures_dir) -> Path:
    """A random Q8_0 GGUF (dim 64, 2 layers) with the Mistral tokenizer embedded: `generate` runs it packed."""
    from llama_min import ModelArgs, load_tokenizer
    from llama_min.formats.common import expected_shapes
    from llama_min.formats.gguf.write import save_gguf

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=96,
                     max_seq_len=256)
    g = torch.Generator().manual_seed(0)
    sd = {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.1 * torch.randn(s, generator=g)
          for k, s in expected_shapes(args).items()}
    path = tmp_path_factory.mktemp("llama_cpp") / "tiny.Q8_0.gguf"
    save_gguf(path, args, sd, load_tokenizer(fixtures_dir / "mistral-tokenizer.model.v1"), qtype="q8_0")
    return path


@pytest.fixture
def threads_kept():
    """bench -t sets torch's thread count in this process: put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


FAST = ["--dtypes", "packed", "--no-load", "--batch", "0", "--new-tokens", "6", "--prompt-len", "4",
        "--prefill-len", "16", "-t", "1"]


def bench(capsys, *argv) -> tuple:
    """(exit code, stdout, stderr lines) of `llama-min bench ARGV` in this process."""
    code = main(["bench", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def assert_one_error_line(code, out, err, *parts):
    assert code == 2 and out == "", (code, out, err)
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for part in parts:
        assert part in err[0], (part, err[0])


def summary_row(out: str, label: str, unit: str) -> tuple:
    """(llama_min's median, llama.cpp's median, ratio, ratio range) as printed on a summary row."""
    line = next(line for line in out.splitlines() if line.strip().startswith(label))
    m = re.search(rf"llama_min +([\d.]+){unit} \[[\d.-]+\] +llama\.cpp +([\d.]+){unit} \[[\d.-]+\] +"
                  rf"ratio ([\d.]+) \[([\d.]+)-([\d.]+)\]$", line)
    assert m, line
    ours, theirs, ratio, lo, hi = map(float, m.groups())
    return ours, theirs, ratio, (lo, hi)


def ratio_bounds(ours: float, theirs: float, places: int) -> tuple:
    """The range ours / theirs can have given that both were printed rounded to `places` decimals."""
    h = 0.5 * 10 ** -places
    return (ours - h) / (theirs + h), (ours + h) / (theirs - h)


# ------------------------------------------------------------------------------------------------ a full run


def test_ratios_and_interleaved_rounds(tmp_path, tiny_gguf, capsys, monkeypatch, threads_kept):
    """Two rounds: every llama_min measurement is followed by llama.cpp's of the same row, with the same
    prompt length, token count and threads; the summary's ratios are llama_min's figures / the fake's."""
    log = tmp_path / "runs.log"
    exe = write_program(tmp_path / "bin", "llama-bench", FAKE_BENCH, log)
    write_program(tmp_path / "bin", "llama-simple", FAKE_SIMPLE, log)

    def logged(name, fn):
        def wrapper(self, *a):
            with open(log, "a") as f:
                f.write(f"ours {name} {a[1] if name == 'decode' else len(a[0])}\n")
            return fn(self, *a)
        return wrapper

    real_wall_time = llama_cpp.wall_time

    def wall_time(cmd, what, model):
        if cmd[0] == sys.executable:
            with open(log, "a") as f:
                f.write(f"ours generate {' '.join(cmd[4:])}\n")
        return real_wall_time(cmd, what, model)

    monkeypatch.setattr(speed.Ours, "decode", logged("decode", speed.Ours.decode))
    monkeypatch.setattr(speed.Ours, "prefill", logged("prefill", speed.Ours.prefill))
    monkeypatch.setattr(llama_cpp, "wall_time", wall_time)
    report = tmp_path / "bench.json"
    code, out, err = bench(capsys, "-m", tiny_gguf, "--vs-llama-cpp", exe, "--rounds", "2", "--json", report, *FAST)
    assert code == 0, err

    cpp = f"t=1 r=1 o=json m={tiny_gguf}"
    simple = f"simple -m {tiny_gguf} -n 32 prompt='Once upon a time'"
    ours_generate = f"ours generate -m {tiny_gguf} -p Once upon a time -n 32 --temperature 0 -t 1 --quiet"
    assert log.read_text().splitlines() == [
        f"cpp p=4 n=2 d=0 {cpp}", simple,                                  # checks before any output
        "ours decode 8", "ours prefill 16", f"cpp p=0 n=8 d=4 {cpp}", f"cpp p=16 n=0 d=0 {cpp}",  # warm-ups
        "ours decode 6", f"cpp p=0 n=6 d=4 {cpp}", "ours decode 6", f"cpp p=0 n=6 d=4 {cpp}",      # decode rounds
        "ours prefill 16", f"cpp p=16 n=0 d=0 {cpp}", "ours prefill 16", f"cpp p=16 n=0 d=0 {cpp}",
        ours_generate, simple,                                             # start + 32 tokens: untimed once
        ours_generate, simple, ours_generate, simple]                      # then the rounds

    assert "llama.cpp: " + str(exe) + " (build fake123, model 'llama ?B Q8_0', 1 threads" in out
    assert "; llama.cpp's llama-bench on the same file:" in out
    assert re.search(r"\n  decode +llama\.cpp +125\.0 tok/s \[125\.0-125\.0\]\n", out), out
    assert re.search(r"\n  prefill +llama\.cpp +500\.0 tok/s \[500\.0-500\.0\]\n", out), out
    for label, fake in (("prompt (16 tokens)", PROMPT_TS), ("decode (6 after 4)", DECODE_TS)):
        ours, theirs, ratio, _ = summary_row(out, label, " tok/s")
        assert theirs == fake
        lo, hi = ratio_bounds(ours, theirs, 1)
        assert lo - 0.005 <= ratio <= hi + 0.005, (label, ours, theirs, ratio)
    data = json.loads(report.read_text())["vs_llama_cpp"]
    # start + 32 tokens: both times vary, so the printed ratio (the median of the rounds' ratios, each
    # llama.cpp's time / ours) is checked against the rounds' times in the JSON report
    ours_s, theirs_s, ratio, (lo, hi) = summary_row(out, "start + 32 tokens (wall)", " s")
    start = data["start"]
    assert theirs_s >= 0.3 and ours_s == round(statistics.median(start["llama_min_s"]), 3)
    assert theirs_s == round(statistics.median(start["llama.cpp_s"]), 3)
    assert start["ratios"] == [b / a for a, b in zip(start["llama_min_s"], start["llama.cpp_s"])]
    assert (ratio, lo, hi) == tuple(round(f(start["ratios"]), 2) for f in (statistics.median, min, max))

    assert data["build_commit"] == "fake123" and data["threads"] == 1 and data["dtype"] == "packed"
    for what, fake in (("prefill", PROMPT_TS), ("decode", DECODE_TS)):
        assert data[what]["llama.cpp"] == [fake, fake]
        assert data[what]["ratios"] == [x / fake for x in data[what]["llama_min"]]


def test_no_llama_simple_skips_the_start_row_in_one_line(tmp_path, tiny_gguf, capsys, threads_kept):
    log = tmp_path / "runs.log"
    exe = write_program(tmp_path / "bin", "llama-bench", FAKE_BENCH, log)
    code, out, err = bench(capsys, "-m", tiny_gguf, "--vs-llama-cpp", exe, "--rounds", "1", *FAST)
    assert code == 0, err
    assert f"  start + 32 tokens: skipped (no llama-simple beside {exe})\n" in out
    assert out.rstrip().endswith(f"skipped (no llama-simple beside {exe})")
    assert summary_row(out, "decode (6 after 4)", " tok/s")[1] == DECODE_TS
    assert not any(line.startswith("simple") for line in log.read_text().splitlines())


# ------------------------------------------------------------------------------------------------ errors


def test_llama_bench_failing_on_the_file_is_its_last_stderr_line(tmp_path, tiny_gguf, capsys, threads_kept):
    exe = write_program(tmp_path / "bin", "llama-bench", FAKE_BENCH, tmp_path / "runs.log", mode="fail")
    code, out, err = bench(capsys, "-m", tiny_gguf, "--vs-llama-cpp", exe, *FAST)
    assert_one_error_line(code, out, err, f"--vs-llama-cpp {exe} failed on {tiny_gguf} (exit 1): "
                          f"llama_bench: error: failed to load model '{tiny_gguf}'")


def test_a_program_that_prints_no_json_is_one_line(tmp_path, tiny_gguf, capsys, threads_kept):
    exe = write_program(tmp_path / "bin", "llama-bench", FAKE_BENCH, tmp_path / "runs.log", mode="not-json")
    code, out, err = bench(capsys, "-m", tiny_gguf, "--vs-llama-cpp", exe, *FAST)
    assert_one_error_line(code, out, err, f"--vs-llama-cpp {exe}: expected llama-bench's JSON results",
                          "got: | model | size")


def test_llama_simple_failing_is_one_line_before_any_output(tmp_path, tiny_gguf, capsys, threads_kept):
    log = tmp_path / "runs.log"
    exe = write_program(tmp_path / "bin", "llama-bench", FAKE_BENCH, log)
    simple = write_program(tmp_path / "bin", "llama-simple", FAKE_SIMPLE, log, mode="fail")
    code, out, err = bench(capsys, "-m", tiny_gguf, "--vs-llama-cpp", exe, *FAST)
    assert_one_error_line(code, out, err, f"{simple} failed on {tiny_gguf} (exit 1): main: error: unable to load")


def test_bad_paths_and_checkpoints_are_one_line_before_any_work(tmp_path, tiny_gguf, capsys, threads_kept):
    from llama_min import save_checkpoint
    from _tiny import tiny_model

    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    own = tmp_path / "own"
    model = tiny_model()
    save_checkpoint(own, model.params, model.state_dict())
    exe = write_program(tmp_path / "bin", "llama-bench", FAKE_BENCH, tmp_path / "runs.log")
    cases = [
        (["--vs-llama-cpp", tmp_path / "missing"], f"--vs-llama-cpp {tmp_path / 'missing'}: no such file"),
        (["--vs-llama-cpp", plain], f"--vs-llama-cpp {plain}: not an executable file"),
        (["--vs-llama-cpp", tmp_path], f"--vs-llama-cpp {tmp_path}: not an executable file"),
        (["--vs-llama-cpp", exe, "--config", "tiny"], "--vs-llama-cpp needs a GGUF file as --ckpt"),
        (["--vs-llama-cpp", exe, "-m", own], f"--vs-llama-cpp needs a GGUF file (llama.cpp runs the same file): "
                                               f"--ckpt {own} is a llama_min checkpoint"),
        (["--vs-llama-cpp", exe, "-m", tiny_gguf, "--dtypes", "float32"], "add packed to --dtypes"),
    ]
    for argv, message in cases:
        code, out, err = bench(capsys, *argv)
        assert_one_error_line(code, out, err, message)
    assert not (tmp_path / "runs.log").exists()  # none of them ran llama-bench


# ------------------------------------------------------------------------------------------------ parsing, help

REAL_0_3_36 = """[
  {
    "build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU",
    "model_filename": "/root/.cache/llama_min/SmolLM2-135M-Instruct.Q4_1.gguf", "model_type": "llama 256M Q4_1",
    "model_size": 96576768, "model_n_params": 134515008, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
    "cpu_mask": "0x0", "cpu_strict": false, "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": -1,
    "n_prompt": 16, "n_gen": 0, "n_depth": 0, "test_time": "2026-12-07T18:09:23Z", "avg_ns": 50112257,
    "stddev_ns": 0, "avg_ts": 319.283165, "stddev_ts": 0.000000, "samples_ns": [ 50112257 ],
    "samples_ts": [ 319.283 ]
  },
  {
    "build_commit": "0c1e570", "build_number": 1, "model_type": "llama 256M Q4_1", "n_threads": 2,
    "n_prompt": 0, "n_gen": 8, "n_depth": 0, "avg_ns": 57544728, "stddev_ns": 0, "avg_ts": 139.022292,
    "stddev_ts": 0.000000, "samples_ns": [ 57544728 ], "samples_ts": [ 139.022 ]
  }
]
"""


def test_parses_what_llama_bench_0_3_36_prints():
    """Fields as llama-cpp-python 0.3.36's vendored llama-bench prints them (-o json), with text around the
    list, and as JSON lines (-o jsonl)."""
    for text in (REAL_0_3_36, "build: 0c1e570 (1)\n" + REAL_0_3_36 + "\nllama_perf: done\n",
                 "\n".join(json.dumps(e) for e in json.loads(REAL_0_3_36))):
        entries = llama_cpp.parse_results(text, "x")
        assert llama_cpp.pick(entries, "prompt", "x")["avg_ts"] == 319.283165
        assert llama_cpp.pick(entries, "decode", "x")["avg_ts"] == 139.022292
    with pytest.raises(ValueError, match="x: no decode test among llama-bench's results"):
        llama_cpp.pick(llama_cpp.parse_results(REAL_0_3_36, "x")[:1], "decode", "x")
    with pytest.raises(ValueError, match="x: expected llama-bench's JSON results"):
        llama_cpp.parse_results("[", "x")


def test_help_explains_the_flag_without_importing_torch():
    code = ("import sys\nfrom llama_min.cli import main\ncode = main(['bench', '--help'])\n"
            "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] == 'torch'), file=sys.stderr)\n"
            "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200"))
    assert r.returncode == 0 and r.stderr.strip() == "IMPORTED []", r.stderr
    help_text = " ".join(r.stdout.split())
    for part in ("--vs-llama-cpp PATH", "llama-bench", "llama-simple",
                 "pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36",
                 "cmake -S vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON "
                 "-DLLAMA_CURL=OFF", "cmake --build build -j2 --target llama-bench llama-simple"):
        assert part in help_text, part


@pytest.mark.skipif(shutil.which("llama-bench") is None, reason="no llama-bench on PATH (llama.cpp not built)")
def test_real_llama_bench_if_on_path(tiny_gguf):
    """Only where llama.cpp is installed: its llama-bench parses (the fakes above stand in for it elsewhere)."""
    bench_ = llama_cpp.LlamaBench(shutil.which("llama-bench"), tiny_gguf, 1)
    info = bench_.probe()
    assert info["n_threads"] == 1 and bench_.decode([[1, 2, 3, 4]], 4) > 0 and bench_.prefill([1] * 8) > 0
