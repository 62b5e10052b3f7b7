"""Train from scratch or fine-tune (full or LoRA) on your own text, on one device or under torchrun.

  Trainer.prepare   read + check everything (data, tokenizer, model, flags) before writing a byte
  Trainer.fit       the loop: AdamW, warmup + cosine, gradient accumulation, clipping, bf16 autocast,
                    eval loss / perplexity + a sample, metrics.jsonl, checkpoints, final export
  lr_at             the learning-rate schedule
  (checkpoints, metrics and torchrun ranks: llama_min.train_state; data: llama_min.data; LoRA: llama_min.lora)

Exact resume: a checkpoint holds the trainable weights, AdamW's moments and step counts, every rank's RNG
state and the data position (samples consumed; the order is a pure function of seed and position, see
`llama_min.data.BatchOrder`). A run stopped at step k and resumed logs the same losses, bit for bit on CPU.

Several processes (`torchrun --nproc_per_node N scripts/train.py ...`): DDP, or FSDP2 (`fully_shard`) with
`fsdp`. `batch_size` is global: each rank reads its slice of every batch and the loss is normalised by the
global number of target tokens, so N processes compute the 1-process gradient. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import build_transformer, load_checkpoint, save_checkpoint
from .data import BatchOrder, PackedData, encode_records, read_records, train_sentencepiece
from .lora import apply_lora, merge_state_dict
from .model import ModelArgs, Transformer
from .train_config import TrainConfig, read_json_file, resolve_model_config
from .train_state import (CKPT_DIR, Dist, atomic_json, finish_dir, full_tensor, list_checkpoints, load_state, log,
                          save_state, tokenizer_files, truncate_metrics)


# ------------------------------------------------------------------------------------------- pieces


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to cfg.lr, then cosine to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * progress))


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2 style init for training from scratch: N(0, 0.02) matrices, the residual outputs (wo, w2)
    scaled by 1/sqrt(2 * n_layers), norms at one."""
    for name, p in model.named_parameters():
        if p.ndim == 1:
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * model.n_layers))
        else:
            nn.init.normal_(p, 0.0, std)


def enable_grad_checkpointing(model: Transformer) -> None:
    """Recompute each block in the backward pass instead of storing its activations.

    The block's own forward is wrapped on the instance, so parameter names do not change.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        def forward(*args, _inner=layer.forward):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False)
            return _inner(*args)
        layer.forward = forward


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps)


# -------------------------------------------------------------------------------------------- trainer


class Trainer:
    """One training run. `prepare` checks every input first; `fit` trains, evaluates, saves, exports."""

    def __init__(self, cfg: TrainConfig, device: torch.device, resume: bool):
        self.cfg, self.device, self.resume = cfg, device, resume
        self.run_dir = Path(cfg.out)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ----------------------------------------------------------------------------------- setup

    @classmethod
    def prepare(cls, cfg: TrainConfig, resume: bool = False) -> "Trainer":
        cfg.check()
        device = Dist.setup(cfg.device)
        self = cls(cfg, device, resume)
        if cfg.batch_size % Dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} does not divide among {Dist.world} processes")
        if (self.run_dir / "run.json").exists() and not resume:
            raise ValueError(f"{self.run_dir}: already holds a run; add --resume to continue it, or pick another --out")
        records = [r for path in cfg.data for r in read_records(path)]
        self.args = self._model_args()
        self.chat = any("messages" in r for r in records)
        self.tok, self.tok_files = self._tokenizer(records)
        if self.args.vocab_size <= 0:  # params.json with vocab_size -1: take it from the tokenizer
            self.args.vocab_size = self.tok.n_words
        if self.tok.n_words > self.args.vocab_size:
            raise ValueError(f"the tokenizer has {self.tok.n_words} tokens but the model's vocab_size is "
                             f"{self.args.vocab_size}")
        ids, mask = encode_records(self.tok, records)
        self.data = PackedData.build(ids, mask, cfg.seq_len, cfg.val_fraction, source=", ".join(cfg.data))
        self.order = BatchOrder(self.data.n_train, cfg.seed)
        self._build_model()
        return self

    def _model_args(self) -> ModelArgs:
        cfg = self.cfg
        if cfg.config:
            path = resolve_model_config(cfg.config)
            args = ModelArgs.from_dict(read_json_file(path, "model config"))
            source = str(path)
        else:
            self.init_args, self.init_sd = load_checkpoint(cfg.init)
            args, source = self.init_args, cfg.init
        if cfg.seq_len > args.max_seq_len:
            raise ValueError(f"--seq-len {cfg.seq_len} is larger than the model's max_seq_len {args.max_seq_len} "
                             f"({source})")
        return args

    def _tokenizer(self, records):
        """The tokenizer: --tokenizer, the --init checkpoint's, this run's, or one trained on the data.

        Sets self.tok_files (copied into final/) and self.pending (run-dir files written at the start:
        nothing is written before every input has been checked).
        """
        cfg, own = self.cfg, self.run_dir / "tokenizer.model"
        path = cfg.tokenizer or cfg.init or (own if self.resume and own.is_file() else None)
        if path == own:  # resuming a run whose tokenizer was trained on its data
            self.pending = {}
            return load_tokenizer(own), [own]
        if path is not None:
            tok = load_tokenizer(path)
            self.pending = {self.run_dir / "tokenizer" / name: blob for name, blob in tokenizer_files(tok, path).items()}
            return tok, list(self.pending)
        if self.args.vocab_size <= 0:
            raise ValueError(f"{cfg.config}: vocab_size must be set to train a tokenizer on the data")
        log(f"training a sentencepiece BPE tokenizer (vocab {self.args.vocab_size}, byte fallback) on the data; "
            f"saving it to {own}")
        proto = train_sentencepiece([r.get("text", "") for r in records], self.args.vocab_size) \
            if Dist.rank == 0 else None
        proto = Dist.broadcast_object(proto)
        self.pending = {own: proto}
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.model").write_bytes(proto)
            tok = load_tokenizer(Path(tmp) / "tokenizer.model")
        return tok, [own]

    def _build_model(self) -> None:
        cfg, args = self.cfg, self.args
        torch.manual_seed(cfg.seed)
        if cfg.config:
            with torch.device("meta"):
                model = Transformer(args)
            model.to_empty(device=self.device)
            model.tie_weights()  # to_empty gives each module its own new tensor: tie them again
            init_weights(model)
        else:
            model = build_transformer(args, self.init_sd, device=self.device, dtype=torch.float32)
            model.tie_weights()
            del self.init_sd
        if cfg.lora_rank:
            n = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
            log(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {n:,} trainable parameters")
        else:
            model.requires_grad_(True)
        model.freqs_cis = model.freqs_cis.to(self.device)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        self.model = model  # the plain Transformer (for export and samples)
        self.wrapped = self._wrap(model)
        self.opt = build_optimizer(self.wrapped, cfg)
        torch.manual_seed(cfg.seed + Dist.rank)  # dropout streams differ per rank

    def _wrap(self, model):
        if Dist.world == 1:
            return model
        if self.cfg.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (Dist.world,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _start_dir(self) -> int:
        """Create the run dir (rank 0) or find the checkpoint to resume; return the first step to run."""
        ckpts = list_checkpoints(self.run_dir) if self.resume else []
        if Dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for target, blob in self.pending.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, target)
            atomic_json(self.run_dir / "run.json", asdict(self.cfg))
        Dist.barrier()
        if not ckpts:
            if self.resume:
                log(f"note: no checkpoint in {self.run_dir / CKPT_DIR}; starting at step 0")
            if Dist.rank == 0:
                truncate_metrics(self.metrics_path, 0)
            return 0
        state = load_state(ckpts[-1], self.wrapped, self.opt, self.device)
        if Dist.rank == 0:
            truncate_metrics(self.metrics_path, state["step"])
        log(f"resumed from {ckpts[-1]} (step {state['step']})")
        self.samples = state["samples_seen"]
        return state["step"]

    # ----------------------------------------------------------------------------------- loop

    def fit(self, stop_after=None) -> Path | None:
        """Run to cfg.max_steps (or stop after `stop_after` with a checkpoint); export DIR/final/."""
        cfg = self.cfg
        self.samples = 0
        step = self._start_dir()
        self.autocast = cfg.bf16 if cfg.bf16 is not None else (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self._announce(step)
        if stop_after is not None and stop_after <= step:
            log(f"nothing to do: the run is already at step {step} (--stop-after {stop_after})")
            return None
        if step == 0 and cfg.eval_every:  # the "before" picture: val loss and sample of the initial model
            self._log_eval(0, self.evaluate(), None)
        bar = self._progress(step)
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            loss = self.train_step(lr)
            step += 1
            dt = time.perf_counter() - t0
            rec = {"step": step, "loss": loss, "lr": lr, "tokens": self.samples * cfg.seq_len,
                   "tok_per_s": round(cfg.batch_size * cfg.grad_accum * cfg.seq_len / dt, 1)}
            if step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0):
                rec.update(self.evaluate())
            self._log_step(rec, bar)
            if step == stop_after or (cfg.save_every and step % cfg.save_every == 0):
                self.save(step, rec)
            if step == stop_after and step < cfg.max_steps:
                if bar is not None:
                    bar.close()
                log(f"stopped after step {step}; continue with --resume")
                return None
        if bar:
            bar.close()
        return self.export()

    def train_step(self, lr: float) -> float:
        """One optimizer step over batch_size * grad_accum windows; returns the global mean token loss."""
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
            with self._no_sync(a < cfg.grad_accum - 1):
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
        return Dist.all_sum(total).item()

    def _no_sync(self, skip: bool):
        if not skip or Dist.world == 1:
            return contextlib.nullcontext()
        if hasattr(self.wrapped, "no_sync"):
            return self.wrapped.no_sync()
        self.wrapped.set_requires_gradient_sync(False)  # FSDP2; set back before the last micro-step
        return _restore_sync(self.wrapped)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss (and perplexity) over up to eval_batches batches, plus a sample on rank 0."""
        cfg, W = self.cfg, Dist.world
        idx = self.data.val_indices()[: cfg.eval_batches * cfg.batch_size]
        if not idx:
            return {}
        sharded = len(idx) >= W
        if sharded:  # shard evenly: every rank runs the same number of forwards (FSDP needs it)
            idx = idx[: len(idx) // W * W]
            idx = idx[Dist.rank * len(idx) // W:(Dist.rank + 1) * len(idx) // W]
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)
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

    def sample(self):
        """A short sampled continuation (temperature 0.8, top-p 0.9) of the sample prompt, or None."""
        cfg = self.cfg
        if not cfg.sample_tokens or Dist.rank or (cfg.fsdp and Dist.world > 1):
            return None
        from .generation import Llama

        prompt = cfg.sample_prompt
        if prompt is None:
            x, _, _ = self.data.window(0)  # the start of the data, cut at a word boundary
            prompt = "" if self.chat else self.tok.decode([t for t in x[:16].tolist() if t != self.tok.bos_id])
            prompt = prompt[: prompt.rfind(" ")] if prompt.rfind(" ") > 0 else prompt
        llama = Llama(self.model, self.tok, max_seq_len=min(self.args.max_seq_len, 512), max_batch_size=1,
                      seed=cfg.seed)
        self.model.eval()
        try:
            if self.chat:
                dialog = [{"role": "user", "content": prompt or "Hello!"}]
                text = llama.chat_completion([dialog], temperature=0.8, max_gen_len=cfg.sample_tokens)
                return {"prompt": prompt, "text": text[0]["generation"]["content"]}
            text = llama.text_completion([prompt], temperature=0.8, max_gen_len=cfg.sample_tokens)
            return {"prompt": prompt, "text": text[0]["generation"]}
        finally:
            self.model.train()

    # ----------------------------------------------------------------------------------- output

    def _announce(self, step: int) -> None:
        cfg, d = self.cfg, self.data
        n_params = sum(p.numel() for p in self.model.parameters())
        log(f"model: {n_params / 1e6:.2f}M parameters ({self.args.dim}d x {self.args.n_layers} layers), "
            f"device {self.device}{', bf16 autocast' if self.autocast else ''}, {Dist.world} process(es)"
            f"{' FSDP' if cfg.fsdp and Dist.world > 1 else ''}")
        log(f"data: {len(d.ids):,} tokens -> {d.n_train} train / {d.n_val} val windows of {cfg.seq_len}; "
            f"{cfg.batch_size * cfg.grad_accum} windows per step; steps {step} -> {cfg.max_steps}")

    def _progress(self, step: int):
        if Dist.rank:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True)

    def _log_step(self, rec: dict, bar) -> None:
        if Dist.rank:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}")
        if "val_loss" in rec:
            self._log_eval(rec["step"], rec, bar)

    def _log_eval(self, step: int, rec: dict, bar) -> None:
        if Dist.rank or "val_loss" not in rec:
            return
        msg = f"step {step}: val loss {rec['val_loss']:.4f}, perplexity {rec['val_ppl']:.2f}"
        if "sample" in rec:
            msg += f"\n  sample: {rec['sample']['prompt']!r} -> {rec['sample']['text']!r}"
        bar.write(msg, file=sys.stderr) if bar is not None else log(msg)

    def save(self, step: int, rec: dict) -> None:
        state = {"samples_seen": self.samples, "loss": rec["loss"], "config": asdict(self.cfg)}
        save_state(self.run_dir, step, self.wrapped, self.opt, state, self.device, self.cfg.keep_checkpoints)

    def export(self) -> Path:
        """Write DIR/final/: plain (LoRA-merged) weights in the own format plus the tokenizer file(s)."""
        sd = {k: full_tensor(v) for k, v in self.model.state_dict().items()}  # gathered on every rank
        sd = merge_state_dict(sd, self.cfg.lora_alpha / self.cfg.lora_rank) if self.cfg.lora_rank else sd
        final = self.run_dir / "final"
        if Dist.rank == 0:
            tmp = Path(tempfile.mkdtemp(dir=self.run_dir, prefix=".final-"))
            save_checkpoint(tmp, self.args, sd, tokenizer_files=self.tok_files)
            finish_dir(tmp)
            old = self.run_dir / ".final-old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            log(f"final model: {final} (load it with load_checkpoint / Llama.build)")
        Dist.barrier()
        return final


class _restore_sync(contextlib.AbstractContextManager):
    def __init__(self, module):
        self.module = module

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
        return False


def load_tokenizer(path):
    from .tokenizer import load_tokenizer as load

    return load(path)


def train(cfg: TrainConfig, resume: bool = False, stop_after=None):
    """Prepare and run a training job; returns DIR/final (None when stopped early)."""
    try:
        trainer = Trainer.prepare(cfg, resume)
        return trainer.fit(stop_after)
    finally:
        Dist.teardown()
