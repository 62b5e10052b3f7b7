"""What a run reports while it trains: a metrics.jsonl line per step, a progress bar, evaluation lines with
a sample, and a closing summary (time, final losses, the command that tries the trained model).

Everything goes to stderr from rank 0 only, so the lines of several processes do not interleave. The progress
bar is drawn only when stderr is a terminal: in a log file there are plain lines (the evaluations, with the
training loss), never carriage returns.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from .dist import Dist, log
from .state import RunDir


class RunLog:
    """The reporting side of one training run."""

    def __init__(self, run: RunDir):
        self.run = run
        self.bar = None
        self.started = time.perf_counter()
        self.first_step = 0
        self.last: dict = {}  # the newest step's record (with val_loss once evaluated)

    def announce(self, cfg, model, args, device, autocast: bool, data, step: int) -> None:
        """Two lines: the model and devices, the data and the steps ahead."""
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {n_params / 1e6:.2f}M parameters ({args.dim}d x {args.n_layers} layers), "
            f"device {device}{', bf16 autocast' if autocast else ''}, {Dist.world} process(es)"
            f"{' FSDP' if cfg.fsdp and Dist.world > 1 else ''}")
        log(f"data: {len(data.ids):,} tokens -> {data.n_train} train / {data.n_val} val windows of {cfg.seq_len}; "
            f"{cfg.batch_size * cfg.grad_accum} windows per step; steps {step} -> {cfg.max_steps}")

    def open_bar(self, step: int, total: int) -> None:
        """Start the clock and (rank 0, stderr a terminal) the progress bar at `step` of `total`."""
        self.started, self.first_step = time.perf_counter(), step
        if Dist.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def step(self, rec: dict) -> None:
        """Record one optimizer step: metrics.jsonl, the bar, and an evaluation line if it has val_loss."""
        self.last = rec
        self.run.append_metrics(rec)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}")
        self.eval(rec["step"], rec)

    def eval(self, step: int, rec: dict) -> None:
        """`step N: val loss L, perplexity P` and the sample, when `rec` holds an evaluation."""
        if Dist.rank or "val_loss" not in rec:
            return
        loss = f"train loss {rec['loss']:.4f}, " if "loss" in rec else ""
        msg = f"step {step}: {loss}val loss {rec['val_loss']:.4f}, perplexity {rec['val_ppl']:.2f}"
        if "sample" in rec:
            msg += f"\n  sample: {rec['sample']['prompt']!r} -> {rec['sample']['text']!r}"
        self.bar.write(msg, file=sys.stderr) if self.bar is not None else log(msg)

    def summary(self, final: Path, prompt: str, chat: bool) -> None:
        """The closing lines: steps and time, final train / val loss, and how to try the model."""
        seconds = time.perf_counter() - self.started
        rec = self.last
        losses = f"train loss {rec['loss']:.4f}" if "loss" in rec else "no step run"
        if "val_loss" in rec:
            losses += f", val loss {rec['val_loss']:.4f} (perplexity {rec['val_ppl']:.2f})"
        prompt = " ".join(prompt.split()) or "The"  # one line to copy
        try_it = (f"llama-min chat --ckpt {shlex.quote(str(final))}" if chat else
                  f"llama-min generate --ckpt {shlex.quote(str(final))} --prompt {shlex.quote(prompt)}")
        log(f"done: steps {self.first_step} -> {rec.get('step', self.first_step)} in {format_seconds(seconds)}; "
            f"{losses}\nfinal model: {final}\ntry it: {try_it}")


def format_seconds(s: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
