"""`llama-min bench` (scripts/benchmark.py) runs end to end on a tiny config (a smoke test: it asserts no timings)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_runs_and_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--config", "tiny",
                        "--vs-transformers", "--rounds", "1", "--new-tokens", "4", "--prompt-len", "4",
                        "--prefill-len", "16", "--batch", "2", "-t", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory bandwidth" in r.stdout and "peak RSS" in r.stdout and "vs transformers" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    got = {(row["dtype"], row["what"], row["impl"]) for row in rows}
    for dtype in ("float32", "bfloat16", "int8"):
        for what in ("decode", "prefill", "batch2"):
            assert {(dtype, what, "llama_min"), (dtype, what, "transformers")} <= got
    # ours is timed directly (> 0); transformers' decode is a difference of two timings, which noise on a
    # busy machine can push below zero with 4 tokens: only check that it is a number
    assert all(x > 0 for row in rows if row["impl"] == "llama_min" for x in row["tok_s"])
    assert all(math.isfinite(x) for row in rows for x in row["tok_s"])
    # every decode measurement has the bandwidth measured just before it, and its share is printed against that
    decode = [row for row in rows if row["what"] == "decode"]
    assert all(len(row["bandwidth_gbs"]) == len(row["tok_s"]) and min(row["bandwidth_gbs"]) > 0 for row in decode)
    assert r.stdout.count("of the bandwidth measured beside it") == 3  # llama_min's decode row of each dtype


def test_bad_flags_are_one_line_before_any_work(capsys):
    from llama_min.cli.bench import main

    assert main(["--config", "tiny", "--rounds", "0"]) == 2
    assert main(["--ckpt", __file__]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "error: --rounds 0: expected an integer in [1, inf]"
    assert err[1].startswith(f"error: --ckpt {__file__}: not a checkpoint: expected GGUF (a .gguf file")
    assert len(err) == 2
