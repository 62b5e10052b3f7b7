"""scripts/benchmark.py runs end to end on a tiny config (a smoke test: it asserts no timings)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_runs_and_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--config", str(ROOT / "configs" / "tiny.json"),
                        "--vs-transformers", "--rounds", "1", "--new-tokens", "4", "--prompt-len", "4",
                        "--prefill-len", "16", "--batch", "2", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory bandwidth" in r.stdout and "peak RSS" in r.stdout and "vs transformers" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    got = {(row["dtype"], row["what"], row["impl"]) for row in rows}
    for dtype in ("float32", "bfloat16", "int8"):
        for what in ("decode", "prefill", "batch2"):
            assert {(dtype, what, "llama_min"), (dtype, what, "transformers")} <= got
    assert all(x > 0 for row in rows for x in row["tok_s"])
