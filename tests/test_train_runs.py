"""The run folder is never lost or left half-written: --out checks, finished runs, damaged checkpoints, a kill
-9 or a full disk while saving, read-only folders; the closing summary; evaluate() before fit()."""

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_min.cli import train as train_cli
from llama_min.train.loop import Trainer
from llama_min.train.config import TrainConfig
from test_train import one_thread  # noqa: F401  (the autouse fixture: one torch thread here too)

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32, max_seq_len=64)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny config, a text, a tokenizer trained on it, and one uninterrupted 6-step run to compare with."""
    from test_train import make_text

    d = tmp_path_factory.mktemp("runs")
    (d / "tiny.json").write_text(json.dumps(TINY))
    (d / "text.txt").write_text(make_text(1500))
    first = _main(d, d / "first", "--max-steps", 1)
    assert first[0] == 0, first[1]
    (d / "tokenizer.model").write_bytes((d / "first" / "tokenizer.model").read_bytes())
    rc, err = _main(d, d / "full")
    assert rc == 0, err
    return d


def _args(d: Path, out: Path, *extra) -> list:
    return ["--config", str(d / "tiny.json"), "--data", str(d / "text.txt"), "--out", str(out),
            "--max-steps", "6", "--batch-size", "2", "--seq-len", "16", "--eval-every", "3", "--sample-tokens", "0",
            "--lr", "3e-3", "--warmup-steps", "2", "--save-every", "1", "--keep-checkpoints", "2",
            *(["--tokenizer", str(d / "tokenizer.model")] if (d / "tokenizer.model").exists() else []),
            *map(str, extra)]


def _main(d: Path, out: Path, *extra):
    """Run the train command with the common flags in this process: (exit code, stderr)."""
    return _capture_main(_args(d, out, *extra))


def _capture_main(argv) -> tuple:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_cli.main(argv)
    return rc, err.getvalue()


def _losses(run: Path) -> list:
    return [(m["step"], m["loss"], m.get("val_loss")) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _temps(folder: Path) -> list:
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp")]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ --out checks


def test_out_checks(shared, tmp_path):
    """A foreign non-empty folder, a file, an existing run without --resume, --resume of a missing folder."""
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    rc, err = _main(shared, foreign)
    assert rc == 2 and f"{foreign}: folder is not empty" in _one_error_line(err)
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    rc, err = _main(shared, a_file)
    assert rc == 2 and f"{a_file}: is a file" in _one_error_line(err) and a_file.read_text() == "x"

    before = _snapshot(shared / "full")
    rc, err = _main(shared, shared / "full")
    assert rc == 2 and "already holds a run; add --resume" in _one_error_line(err)
    assert _snapshot(shared / "full") == before

    missing = tmp_path / "nope"
    rc, err = _capture_main(["--out", str(missing), "--resume"])
    assert rc == 2 and f"{missing}: no such folder" in _one_error_line(err) and not missing.exists()


def test_overwrite_replaces_a_previous_run(shared, tmp_path):
    """--overwrite starts again: the old run's checkpoints and metrics are gone, other files stay."""
    out = tmp_path / "r"
    assert _main(shared, out, "--stop-after", 2)[0] == 0
    (out / "checkpoints" / "step_00000009").mkdir()  # from the old run: must not survive
    (out / "keep.me").write_text("mine")
    rc, err = _main(shared, out, "--max-steps", 6, "--overwrite")
    assert rc == 0, err
    assert _losses(out) == _losses(shared / "full")
    assert (out / "keep.me").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005", "step_00000006"]


# ------------------------------------------------------------------------------------------ finished runs


def test_resume_of_a_finished_run_changes_nothing(shared):
    run = shared / "full"
    before = _snapshot(run)
    rc, err = _capture_main(["--out", str(run), "--resume"])
    assert rc == 0 and "the run is finished (step 6 of 6)" in err and f"{run / 'final'}" in err
    assert _snapshot(run) == before  # byte-identical, not even rewritten


def test_resume_with_grad_checkpointing_from_a_run_saved_without(shared, tmp_path):
    """A run folder written without --grad-checkpointing resumes with it (the parameter names are the
    same) and logs the losses of the uninterrupted run."""
    out = tmp_path / "run"
    rc, err = _main(shared, out, "--stop-after", 3)
    assert rc == 0, err
    rc, err = _capture_main(["--out", str(out), "--resume", "--grad-checkpointing"])
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["grad_checkpointing"] is True
    a, b = _losses(shared / "full"), _losses(out)
    assert [s for s, *_ in a] == [s for s, *_ in b] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([x[1] for x in b]), torch.tensor([x[1] for x in a]))


# ------------------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize("damage", ["truncated-weights", "broken-state"])
def test_damaged_latest_checkpoint_falls_back(shared, tmp_path, damage):
    out = tmp_path / "r"
    assert _main(shared, out, "--stop-after", 4)[0] == 0
    latest = out / "checkpoints" / "step_00000004"
    if damage == "truncated-weights":
        blob = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        broken = latest / "model.safetensors"
    else:
        (latest / "state.json").write_text('{"step": 4, "samp')
        broken = latest / "state.json"
    rc, err = _capture_main(["--out", str(out), "--resume"])
    assert rc == 0, err
    assert f"warning: {broken}" in err and f"falling back to {out / 'checkpoints' / 'step_00000003'}" in err
    assert "resuming" in err and "at step 3" in err
    assert _losses(out) == _losses(shared / "full")
    assert (out / "final" / "model.safetensors").read_bytes() == (shared / "full" / "final" /
                                                                 "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------- interrupted checkpoint writes


KILL_DURING_SAVE = """
import os, signal, sys
import llama_min.train.state as ts
real = ts.write_checkpoint
def write_checkpoint(folder, weights, extra, state):
    if state["step"] == 4:  # half the weights file on disk, then the process dies with no chance to clean up
        real(folder, weights, extra, state)
        blob = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(folder, weights, extra, state)
ts.write_checkpoint = write_checkpoint
from llama_min.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a fresh Python process (~10 s on a busy 2-core machine)
def test_kill_9_while_saving_then_resume(shared, tmp_path):
    """A process killed (SIGKILL) in the middle of writing a checkpoint: --resume ignores and removes the temp
    folder and logs exactly the losses of the uninterrupted run."""
    out = tmp_path / "r"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *_args(shared, out)], capture_output=True,
                         text=True, env=env, timeout=120, cwd=ROOT)
    assert res.returncode == -9, res.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == \
        ["step_00000002", "step_00000003"]
    assert _temps(out), "the kill should have left a temp folder behind"
    rc, err = _main(shared, out, "--resume")
    assert rc == 0, err
    assert "removed" in err and not _temps(out)
    assert _losses(out) == _losses(shared / "full")


def _failing_writer(monkeypatch, code: int, step: int = 4):
    import llama_min.train.state as ts

    real = ts.write_checkpoint

    def write_checkpoint(folder, weights, extra, state):
        if state["step"] == step:
            real(folder, weights, {}, state)  # some files written, then the disk is full
            raise OSError(code, os.strerror(code), str(folder / "optimizer.safetensors"))
        real(folder, weights, extra, state)

    monkeypatch.setattr(ts, "write_checkpoint", write_checkpoint)


def test_disk_full_while_saving_then_resume(shared, tmp_path, monkeypatch):
    out = tmp_path / "r"
    with monkeypatch.context() as m:
        _failing_writer(m, errno.ENOSPC)
        rc, err = _main(shared, out)
    assert rc == 1
    assert _last_line(err) == f"error: {out / 'checkpoints' / 'step_00000004'}: No space left on device (while writing the " \
                   "checkpoint of step 4)"
    assert not _temps(out) and not (out / "final").exists()
    rc, err = _main(shared, out, "--resume")
    assert rc == 0, err
    assert _losses(out) == _losses(shared / "full") and not _temps(out)


def _last_line(err: str) -> str:
    """The error line (progress and log lines of the run come before it)."""
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_final_export_is_one_line(shared, tmp_path, monkeypatch, code):
    import llama_min.checkpoint as ckpt

    def save_checkpoint(folder, *a, **k):
        raise OSError(code, os.strerror(code), str(folder / "model.safetensors"))

    monkeypatch.setattr(ckpt, "save_checkpoint", save_checkpoint)
    out = tmp_path / "r"
    rc, err = _main(shared, out, "--max-steps", 2)
    assert rc == 1
    assert _last_line(err) == f"error: {out / 'final'}: {os.strerror(code)} (while writing the final model)"
    assert not _temps(out) and not (out / "final").exists()


# ------------------------------------------------------------------------------------------- the summary


def test_closing_summary(shared):
    """The last lines: steps and time, the final losses as logged in metrics.jsonl, the command to try, and
    why the run stopped."""
    run = shared / "full"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    out = shared / "summary"
    rc, err = _main(shared, out)
    assert rc == 0, err
    tail = err.strip().splitlines()[-4:]
    assert tail[0].startswith("done: steps 0 -> 6 in ") and " s; " in tail[0]
    assert f"train loss {last['loss']:.4f}, val loss {last['val_loss']:.4f}" in tail[0]
    assert tail[1] == f"final model: {out / 'final'}"
    assert tail[2].startswith(f"try it: llama-min generate --ckpt {out / 'final'} --prompt ")
    assert tail[3] == f"[stopped: reached --max-steps 6; model in {out / 'final'}]"


# ---------------------------------------------------------------------------------------- evaluate first


def test_evaluate_before_fit_writes_nothing(shared, tmp_path):
    """The constructor sets all state: evaluate() runs before fit() and nothing is written.

    A freshly initialised model (weights ~ N(0, 0.02)) predicts nearly uniformly over the 320 tokens, so its
    validation loss is close to ln(320) = 5.768.
    """
    out = tmp_path / "r"
    cfg = TrainConfig().updated(dict(config=str(shared / "tiny.json"), data=[str(shared / "text.txt")],
                                     out=str(out), tokenizer=str(shared / "tokenizer.model"), batch_size=2,
                                     seq_len=16, sample_tokens=3), "test")
    trainer = Trainer(cfg)
    rng = torch.get_rng_state()
    rec = trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), rng)  # the sample draws from its own generator
    assert abs(rec["val_loss"] - math.log(320)) < 0.05, rec
    assert rec["val_ppl"] == pytest.approx(math.exp(rec["val_loss"]))
    assert isinstance(rec["sample"]["text"], str)
    assert not out.exists()


def test_temp_leftovers_of_a_killed_start_do_not_block(shared, tmp_path):
    """A folder holding only temp files (a first start killed while writing) is reused; the temps go."""
    out = tmp_path / "r"
    out.mkdir()
    (out / ".tmp-run.json.k1ll3d.tmp").write_text("{")
    rc, err = _main(shared, out, "--max-steps", 2)
    assert rc == 0, err
    assert not _temps(out) and (out / "final" / "model.safetensors").is_file()


def test_debug_shows_the_traceback(shared, tmp_path):
    bad = ["--config", str(shared / "tiny.json"), "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]
    rc, err = _capture_main(bad)
    assert rc == 2 and "Traceback" not in err and _one_error_line(err).endswith("none.txt: no such file")
    rc, err = _capture_main([*bad, "--debug"])
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].endswith("none.txt: no such file")
