"""--resume of a finished run trains on from final/ without losing it; the train command's voice: -m/--ckpt
is --init, a loading line, no progress bar (no carriage returns) off a terminal, a line saying why it stopped."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from llama_min import load_checkpoint
from llama_min.cli import train as train_cli
from test_train import TINY_MODEL, make_text, one_thread  # noqa: F401  (the autouse fixture: one torch thread)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny config, a text and a tokenizer trained on it (so runs skip that step)."""
    d = tmp_path_factory.mktemp("resume")
    (d / "tiny.json").write_text(json.dumps(TINY_MODEL))
    (d / "text.txt").write_text(make_text(1500))
    rc, err = _main(_args(d, d / "tok", "--max-steps", 1))
    assert rc == 0, err
    shutil.copy(d / "tok" / "tokenizer.model", d / "tokenizer.model")
    return d


def _args(d: Path, out: Path, *extra) -> list:
    tok = ["--tokenizer", str(d / "tokenizer.model")] if (d / "tokenizer.model").exists() else []
    return ["--config", str(d / "tiny.json"), "--data", str(d / "text.txt"), "--out", str(out), "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "2", "--sample-tokens", "0", "--lr", "1e-2", "--warmup-steps", "1",
            *tok, *map(str, extra)]


def _main(argv) -> tuple:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_cli.main([str(a) for a in argv])
    return rc, err.getvalue()


def _command(*argv) -> subprocess.CompletedProcess:
    """The installed `llama-min train`, stderr a pipe (not a terminal)."""
    return subprocess.run(["llama-min", "train", *map(str, argv)], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _final_bytes(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((run / "final").iterdir())}


def _steps(run: Path) -> list:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("saves", ["none", "older", "same"])
def test_resume_of_a_finished_run_trains_on(shared, tmp_path, saves):
    """A run finished at step 4 continues to --max-steps 8: from final/ (no checkpoint, or an older one) or from
    the checkpoint of step 4 (exact). final/ keeps its bytes until the continued run is complete (a stop after
    step 6 leaves it alone); the metrics lines of steps 1-4 stay byte for byte."""
    run = tmp_path / "r"
    every = {"none": 0, "older": 3, "same": 2}[saves]
    rc, err = _main(_args(shared, run, "--max-steps", 4, "--save-every", every))
    assert rc == 0, err
    before, lines = _final_bytes(run), (run / "metrics.jsonl").read_bytes()
    rc, err = _main(["--out", run, "--resume", "--max-steps", 8, "--stop-after", 6])
    assert rc == 0, err
    if saves == "same":
        assert "resuming" in err and "at step 4" in err
    else:
        assert f"loading {run / 'final'} (llama_min, " in err
        assert f"continuing {run} from {run / 'final'} at step 4 to 8: its weights and a fresh AdamW" in err
    assert err.strip().splitlines()[-1] == "[stopped after step 6 (--stop-after); continue with --resume]"
    assert _final_bytes(run) == before
    rc, err = _main(["--out", run, "--resume"])
    assert rc == 0, err
    assert err.strip().splitlines()[-1] == f"[stopped: reached --max-steps 8; model in {run / 'final'}]"
    assert (run / "metrics.jsonl").read_bytes().startswith(lines)
    assert _steps(run) == list(range(1, 9))
    assert json.loads((run / "final" / "trained.json").read_text())["step"] == 8
    assert _final_bytes(run)["model.safetensors"] != before["model.safetensors"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[4] < losses[0] - 0.3  # step 5 starts from the trained weights, not from a new init


def test_resume_with_nothing_to_do(shared, tmp_path):
    """The same --max-steps (or a smaller one): exit 0, one line, the folder byte for byte untouched."""
    run = tmp_path / "r"
    assert _main(_args(shared, run, "--max-steps", 3))[0] == 0
    snapshot = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    res = _command("--out", run, "--resume")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"{run}: the run is finished (step 3 of 3); its model is {run / 'final'}; nothing to do "
        "(a larger --max-steps continues it)"]
    rc, err = _main(["--out", run, "--resume", "--max-steps", 2])
    assert rc == 0 and "the run is finished at step 3, past --max-steps 2" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == snapshot


def test_lora_run_continues_on_its_merged_model(shared, tmp_path):
    """A finished LoRA run (even with a checkpoint of its last step) continues from final/: fresh adapters on
    the merged weights. That continuation stopped and resumed from its own checkpoint logs the same losses
    as without the stop: the checkpoint's adapters go back onto final/'s weights."""
    base = tmp_path / "base"
    assert _main(_args(shared, base, "--max-steps", 2))[0] == 0
    lora = ["--init", base / "final", "--data", shared / "text.txt", "--batch-size", 2, "--seq-len", 16,
            "--eval-every", 0, "--sample-tokens", 0, "--lr", 1e-2, "--lora-rank", 4, "--save-every", 3]
    assert _main([*lora, "--out", tmp_path / "a", "--max-steps", 3])[0] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    rc, err = _main(["--out", tmp_path / "a", "--resume", "--max-steps", 6])
    assert rc == 0, err
    assert "at step 3 to 6: fresh rank-4 LoRA adapters on its merged weights and a fresh AdamW" in err
    rc, err = _main(["--out", tmp_path / "b", "--resume", "--max-steps", 6, "--stop-after", 4])
    assert rc == 0, err
    rc, err = _main(["--out", tmp_path / "b", "--resume"])
    assert rc == 0 and "resuming" in err and "at step 4" in err, err
    loss = [[json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in "ab"]
    assert len(loss[0]) == 6 and loss[0] == loss[1]
    _, sd = load_checkpoint(tmp_path / "b" / "final")
    assert not any("lora" in k for k in sd)


def test_m_is_init_and_the_command_speaks_plainly(shared, tmp_path):
    """-m fine-tunes exactly like --init; the command says what it loads, draws no progress bar into a pipe
    (no carriage return) and ends with why it stopped."""
    base = tmp_path / "base"
    assert _main(_args(shared, base, "--max-steps", 1))[0] == 0
    common = ["--data", shared / "text.txt", "--batch-size", 2, "--seq-len", 16, "--eval-every", 1,
              "--sample-tokens", 0, "--max-steps", 2]
    res = _command("-m", base / "final", *common, "--out", tmp_path / "m")
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith(f"loading {base / 'final'} (llama_min, ") and lines[0].endswith(" KB)...")
    assert any(line.startswith("step 1: train loss ") for line in lines)
    assert lines[-1] == f"[stopped: reached --max-steps 2; model in {tmp_path / 'm' / 'final'}]"
    assert json.loads((tmp_path / "m" / "run.json").read_text())["init"] == str(base / "final")
    rc, err = _main(["--init", base / "final", *common, "--out", tmp_path / "i"])
    assert rc == 0, err
    assert [json.loads(x)["loss"] for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(x)["loss"] for x in (tmp_path / "i" / "metrics.jsonl").read_text().splitlines()]


def test_interruption_says_where_resume_continues(shared, tmp_path, monkeypatch):
    """Ctrl-C during step 3: exit 130 and a line naming the step and the checkpoint --resume will use."""
    from llama_min.train.loop import Trainer

    real = Trainer.train_step

    def train_step(self, lr):
        if self.step == 2:
            raise KeyboardInterrupt
        return real(self, lr)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "r"
    rc, err = _main(_args(shared, run, "--max-steps", 5, "--save-every", 1))
    assert rc == 130
    assert (f"[interrupted at step 2; --resume continues from the checkpoint of step 2 in {run / 'checkpoints'}]"
            in err.splitlines())
