"""Train from scratch or fine-tune (full or LoRA) on your own text, on one device or under torchrun.

  Trainer(cfg)      reads and checks every input, checks a step fits in memory (memory.py), builds the
                    model, optimizer and (with resume) the checkpoint's state: nothing is written yet, and
                    `evaluate()` already works
  Trainer.fit       creates the run folder, then the loop: AdamW, warmup + cosine, gradient accumulation,
                    clipping, bf16 autocast, eval loss / perplexity + a sample, metrics.jsonl, checkpoints,
                    final export, a closing summary and a last line saying why it stopped
  train             the whole job as the command line runs it
  finished_line     why a --resume has nothing to do (the run reached --max-steps), or None
  lr_at             the learning-rate schedule

The jobs around the loop live beside it: inputs and model (prepare.py), several processes
(dist.py), the run folder and its checkpoints (state.py), reporting (metrics.py), the memory
preflight (memory.py).

Exact resume: a checkpoint holds the trainable weights, AdamW's moments and step counts, every rank's RNG
state and the data position (samples consumed; the order is a pure function of seed and position, see
`llama_min.train.data.BatchOrder`). A run stopped at step k and resumed logs the same losses, bit for bit on CPU.

Several processes (`torchrun --nproc_per_node N scripts/train.py ...`): DDP, or FSDP2 (`fully_shard`) with
`fsdp`. `batch_size` is global: each rank reads its slice of every batch and the loss is normalised by the
global number of target tokens, so N processes compute the 1-process gradient. Only rank 0 writes files.

Continuing a finished run: `--resume` with a larger `--max-steps` trains on from final/ when no checkpoint is
as new (its weights and data position; AdamW starts fresh, and a LoRA run puts fresh adapters on the merged
weights). The LR schedule is that of the new --max-steps. final/ is replaced only once the new one is complete
and metrics.jsonl is appended to.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import BatchOrder
from ..errors import LlamaMinError
from .lora import merge_state_dict
from .config import TrainConfig
from .metrics import RunLog
from .dist import Dist, full_tensor, log, no_sync, trainable_named, wrap_model
from .prepare import build_model, init_weights, prepare_inputs  # noqa: F401  (init_weights: re-export)
from .state import CKPT_DIR, ResumeFrom, RunDir


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to cfg.lr, then cosine to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps)


class Trainer:
    """One training run. The constructor checks every input and sets all state; `fit` trains and writes."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False):
        cfg.check()
        if resume and overwrite:
            raise LlamaMinError("--resume continues the run in --out, --overwrite starts it again: give one")
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.run = RunDir(cfg.out)
        self.run.check(resume, overwrite)
        self.start = self.run.resume_from(bool(cfg.lora_rank)) if resume else ResumeFrom("start")
        self.device = Dist.setup(cfg.device)
        if cfg.batch_size % Dist.world:
            raise LlamaMinError(f"--batch-size {cfg.batch_size} does not divide among {Dist.world} processes")
        self.inputs = prepare_inputs(cfg, self.run.path, resume, self.start.base, self.device)
        self.data, self.tok, self.args = self.inputs.data, self.inputs.tok, self.inputs.args
        self.model = build_model(cfg, self.inputs, self.device)  # the plain Transformer (export, samples)
        self.wrapped = wrap_model(self.model, self.device, cfg.fsdp)  # what the training step calls
        # the trainable parameters as the optimizer holds them (an FSDP2 root module shows its unsharded
        # tensors instead after a forward without backward, e.g. an evaluation): checkpoints use these
        self.named = trainable_named(self.wrapped)
        self.opt = build_optimizer(self.wrapped, cfg)
        torch.manual_seed(cfg.seed + Dist.rank)  # dropout streams differ per rank
        self.order = BatchOrder(self.data.n_train, cfg.seed)
        self.autocast = cfg.bf16 if cfg.bf16 is not None else (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.step, self.samples = 0, 0  # optimizer steps done, training windows consumed
        self.base_step = self.start.base_step  # the step of final/ this run's weights continue (None: none)
        self.log = RunLog(self.run)
        if resume:
            self._restore()

    @property
    def tok_files(self) -> list:
        return self.inputs.tok_files

    def _restore(self) -> None:
        """Continue from final/ (a finished run), or load the newest readable checkpoint of the run (weights,
        AdamW, RNG, data position)."""
        if self.start.kind == "final":
            self._continue_from_final()
            return
        state = self.run.restore(self.named, self.opt, self.device)
        if state is None:
            log(f"note: no checkpoint in {self.run.path / CKPT_DIR}; starting at step 0")
            return
        self.step, self.samples = state["step"], state["samples_seen"]
        self.base_step = state.get("base_step")
        log(f"resuming {self.run.path} at step {self.step}")

    def _continue_from_final(self) -> None:
        """The model was built from final/: take its step and data position; AdamW starts empty."""
        cfg, start = self.cfg, self.start
        self.step = start.step
        self.samples = start.samples if start.samples is not None else start.step * cfg.batch_size * cfg.grad_accum
        torch.manual_seed(start.step * 7919 + Dist.rank)  # dropout: no RNG state was saved with final/
        weights = (f"fresh rank-{cfg.lora_rank} LoRA adapters on its merged weights" if cfg.lora_rank
                   else "its weights")
        log(f"continuing {self.run.path} from {self.run.final} at step {self.step} to {cfg.max_steps}: "
            f"{weights} and a fresh AdamW (no checkpoint holds the optimizer's state of step {self.step})")

    # ----------------------------------------------------------------------------------------- loop

    def fit(self, stop_after: Optional[int] = None) -> Optional[Path]:
        """Run to cfg.max_steps (or stop after `stop_after` with a checkpoint); export and return DIR/final/."""
        cfg = self.cfg
        line = finished_line(cfg) if self.start.kind == "final" else None
        if line is not None:  # final/ already reached --max-steps: nothing is rewritten
            log(line)
            return self.run.final
        if stop_after is not None and stop_after <= self.step:
            log(f"nothing to do: the run is already at step {self.step} (--stop-after {stop_after})")
            return None
        self.run.start(asdict(cfg), self.inputs.tok_blobs, self.overwrite)
        self.run.truncate_metrics(self.step)
        self.log.announce(cfg, self.model, self.args, self.device, self.autocast, self.data, self.step)
        if self.step == 0 and cfg.eval_every:  # the "before" picture: val loss and sample of the initial model
            self.log.eval(0, self.evaluate())
        self.log.open_bar(self.step, cfg.max_steps)
        try:
            while self.step < cfg.max_steps:
                rec = self._step_and_log()
                if self.step == stop_after or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save(rec)
                if self.step == stop_after and self.step < cfg.max_steps:
                    self.log.close_bar()
                    log(f"[stopped after step {self.step} (--stop-after); continue with --resume]")
                    return None
            self.log.close_bar()
            final = self.export()
        except KeyboardInterrupt:
            self.log.close_bar()
            log(self._interrupted_line())
            raise
        finally:
            self.log.close_bar()
        self.log.summary(final, self.sample_prompt(), self.inputs.chat)
        log(f"[stopped: reached --max-steps {cfg.max_steps}; model in {final}]")
        return final

    def _interrupted_line(self) -> str:
        """`[interrupted at step N; ...]`: what --resume will continue from."""
        try:
            start = self.run.resume_from(bool(self.cfg.lora_rank))
        except LlamaMinError:
            start = ResumeFrom("start")
        where = {"checkpoint": f"the checkpoint of step {start.step} in {self.run.ckpt_root}",
                 "final": f"{self.run.final} (step {start.step})"}
        return (f"[interrupted at step {self.step}; --resume continues from "
                f"{where.get(start.kind, 'step 0 (no checkpoint: --save-every K writes them)')}]")

    def _step_and_log(self) -> dict:
        """One optimizer step, evaluated when due, recorded in metrics.jsonl."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg)
        loss = self.train_step(lr)
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.samples * cfg.seq_len,
               "tok_per_s": round(cfg.batch_size * cfg.grad_accum * cfg.seq_len / dt, 1)}
        if self.step == cfg.max_steps or (cfg.eval_every and self.step % cfg.eval_every == 0):
            rec.update(self.evaluate())
        self.log.step(rec)
        return rec

    def train_step(self, lr: float) -> float:
        """One optimizer step over batch_size * grad_accum windows; returns the global mean token loss.

        loss = sum over target tokens of -log p(target) / (global number of target tokens), summed over
        micro-steps and ranks, so accumulation and N processes give the 1-process gradient.
        """
        cfg, data, W = self.cfg, self.data, Dist.world
        for group in self.opt.param_groups:
            group["lr"] = lr
        idx = self.order.indices(self.samples, cfg.batch_size * cfg.grad_accum)
        n_targets = int(sum(data.window(i)[2].sum() for i in idx))  # global count, the same on every rank
        per_rank = cfg.batch_size // W
        total = torch.zeros((), device=self.device)
        for a in range(cfg.grad_accum):
            micro = idx[a * cfg.batch_size:(a + 1) * cfg.batch_size]
            x, y, m = (t.to(self.device) for t in data.batch(micro[Dist.rank * per_rank:(Dist.rank + 1) * per_rank]))
            with no_sync(self.wrapped, a < cfg.grad_accum - 1):
                with self._autocast():
                    logits = self.wrapped(x)
                    loss = F.cross_entropy(logits.flatten(0, 1), y.masked_fill(~m, -100).flatten(),
                                           ignore_index=-100, reduction="sum") / max(n_targets, 1)
                (loss * W).backward()  # DDP/FSDP average gradients over ranks; * W makes that a sum
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.wrapped.parameters() if p.requires_grad], cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.samples += cfg.batch_size * cfg.grad_accum
        self.step += 1
        return Dist.all_sum(total).item()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    # ----------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss (and perplexity = exp(loss)) over up to eval_batches batches, plus a sample."""
        cfg, W = self.cfg, Dist.world
        idx = self.data.val_indices()[: cfg.eval_batches * cfg.batch_size]
        if not idx:
            return {}
        sharded = len(idx) >= W
        if sharded:  # shard evenly: every rank runs the same number of forwards (FSDP needs it)
            idx = idx[: len(idx) // W * W]
            idx = idx[Dist.rank * len(idx) // W:(Dist.rank + 1) * len(idx) // W]
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # (summed token loss, target count)
        self.wrapped.eval()
        per = max(1, cfg.batch_size // W)
        for s in range(0, len(idx), per):
            x, y, m = (t.to(self.device) for t in self.data.batch(idx[s:s + per]))
            with self._autocast():
                logits = self.wrapped(x)
            y = y.masked_fill(~m, -100).flatten()
            sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), y, ignore_index=-100, reduction="sum")
            sums[1] += m.sum()
        if sharded:
            Dist.all_sum(sums)
        self.wrapped.train()
        val = (sums[0] / sums[1].clamp(min=1)).item()
        out = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        sample = self.sample()
        if sample is not None:
            out["sample"] = sample
        return out

    def sample_prompt(self) -> str:
        """--sample-prompt, or the start of the data cut at a word boundary ("" for chat data)."""
        if self.cfg.sample_prompt is not None:
            return self.cfg.sample_prompt
        if self.inputs.chat:
            return ""
        x, _, _ = self.data.window(0)
        prompt = self.tok.decode([t for t in x[:16].tolist() if t != self.tok.bos_id])
        return prompt[: prompt.rfind(" ")] if prompt.rfind(" ") > 0 else prompt

    def sample(self) -> Optional[dict]:
        """A short sampled continuation (temperature 0.8, top-p 0.9) of the sample prompt, or None."""
        cfg = self.cfg
        if not cfg.sample_tokens or Dist.rank or (cfg.fsdp and Dist.world > 1):
            return None
        from ..generation import Llama

        prompt = self.sample_prompt()
        llama = Llama(self.model, self.tok, max_seq_len=min(self.args.max_seq_len, 512), max_batch_size=1)
        opts = dict(temperature=0.8, max_gen_len=cfg.sample_tokens, seed=cfg.seed)  # a private generator:
        self.model.eval()                                                         # training's RNG is untouched
        try:
            if self.inputs.chat:
                dialog = [{"role": "user", "content": prompt or "Hello!"}]
                text = llama.chat_completion([dialog], **opts)
                return {"prompt": prompt, "text": text[0]["generation"]["content"]}
            text = llama.text_completion([prompt], **opts)
            return {"prompt": prompt, "text": text[0]["generation"]}
        finally:
            self.model.train()

    # --------------------------------------------------------------------------------------- output

    def save(self, rec: dict) -> None:
        """A resumable checkpoint of the current step (every rank calls this)."""
        state = {"samples_seen": self.samples, "loss": rec["loss"], "config": asdict(self.cfg),
                 "base_step": self.base_step}
        self.run.save(self.step, self.named, self.opt, state, self.device, self.cfg.keep_checkpoints)

    def export(self) -> Path:
        """Write DIR/final/: plain (LoRA-merged) weights in the own format plus the tokenizer file(s)."""
        sd = {k: full_tensor(v) for k, v in self.model.state_dict().items()}  # gathered on every rank
        if self.cfg.lora_rank:
            sd = merge_state_dict(sd, self.cfg.lora_alpha / self.cfg.lora_rank)
        final = self.run.export(self.args, sd, self.inputs.tok_files, {"step": self.step, "samples_seen": self.samples})
        Dist.barrier()
        return final


def train(cfg: TrainConfig, resume: bool = False, stop_after: Optional[int] = None,
          overwrite: bool = False) -> Optional[Path]:
    """Prepare and run a training job; returns DIR/final (None when stopped early).

    Resuming a finished run with no larger --max-steps changes nothing and returns final/.
    """
    line = finished_line(cfg) if resume else None
    if line is not None:
        log(line)
        return RunDir(cfg.out).final
    try:
        return Trainer(cfg, resume, overwrite).fit(stop_after)
    finally:
        Dist.teardown()


def finished_line(cfg: TrainConfig) -> Optional[str]:
    """For --resume: the line saying the run in cfg.out is finished and --max-steps asks for no more steps
    (None when there is training to do)."""
    if not cfg.out:
        return None
    run = RunDir(cfg.out)
    final = run.final_state()
    if final is None or final["step"] < cfg.max_steps:
        return None
    if run.resume_from(bool(cfg.lora_rank)).step > final["step"]:  # a newer checkpoint: resume it
        return None
    done = final["step"]
    where = f"(step {done} of {cfg.max_steps})" if done == cfg.max_steps else f"at step {done}, past --max-steps {cfg.max_steps}"
    return (f"{run.path}: the run is finished {where}; its model is {run.final}; nothing to do "
            f"(a larger --max-steps continues it)")
