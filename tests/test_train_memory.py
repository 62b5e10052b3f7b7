"""Training's memory preflight: the estimate bounds a measured step, and a run that cannot fit is refused
with one line naming the numbers and the flags to change, before anything is built or written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_min.cli import train as train_cli
from test_train import one_thread, tiny_inputs  # noqa: F401  (one_thread: the autouse fixture, one torch thread)

MEASURE = """
import json, sys, torch, torch.nn.functional as F
from llama_min.model import ModelArgs, Transformer
from llama_min.train.config import TrainConfig
from llama_min.train.memory import estimate

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

torch.set_num_threads(1)
args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=32, max_seq_len=256)
cfg = TrainConfig(batch_size=4, seq_len=256)
x = torch.randint(0, args.vocab_size, (cfg.batch_size, cfg.seq_len + 1))
before = rss("VmRSS")
model = Transformer(args)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for _ in range(2):  # the second step holds AdamW's moments too
    logits = model(x[:, :-1])  # kept until the end of the step, as in Trainer.train_step
    F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"measured": rss("VmHWM") - before, "estimate": estimate(args, cfg).total}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident size from /proc")
def test_estimate_bounds_a_measured_step():
    """Two real training steps in a fresh process: the peak of its resident size (large blocks go back to the
    system when freed, so it follows the live tensors) <= the estimate <= 3x it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)
    print(f"[memory] measured {m['measured'] / 2**20:.1f} MiB, estimated {m['estimate'] / 2**20:.1f} MiB")
    assert m["measured"] <= m["estimate"] <= 3 * m["measured"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("mem"), 800)


def _argv(d: Path, out: Path, *extra) -> list:
    return ["--config", str(d / "tiny.json"), "--data", str(d / "text.txt"), "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0", *map(str, extra)]


def test_preflight_refuses_when_free_memory_is_small(inputs, tmp_path, monkeypatch, capsys):
    import llama_min.runtime.memory as memory

    monkeypatch.setattr(memory, "free_memory", lambda device: 2**20)  # 1 MiB free: less than any run needs
    out = tmp_path / "r"
    rc = train_cli.main(_argv(inputs, out, "--lora-rank", "4"))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    line = err.splitlines()[-1]
    assert line.startswith("error: training needs about ") and "but only 1.0 MiB is free" in line
    for words in ("weights ", "gradients + AdamW ", "activations ", "logits ", "--batch-size 2 x --seq-len 16",
                  "lower --batch-size", "--grad-accum", "lower --seq-len", "add --grad-checkpointing",
                  "lower --lora-rank"):
        assert words in line, words
    assert not out.exists()  # refused before anything was written


def test_preflight_lets_a_fitting_run_through(inputs, tmp_path, monkeypatch, capsys):
    import llama_min.runtime.memory as memory

    monkeypatch.setattr(memory, "free_memory", lambda device: 2**30)
    assert train_cli.main(_argv(inputs, tmp_path / "r")) == 0
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file()


def test_preflight_refusal_of_the_command(inputs, tmp_path):
    """The installed command, asked for a batch no machine holds: exit 2, one `error:` line, no traceback."""
    out = tmp_path / "r"
    res = subprocess.run(["llama-min", "train", *_argv(inputs, out)[:-6], "--batch-size", str(10**8),
                          "--seq-len", "64", "--sample-tokens", "0"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training needs about ") and "GiB" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
