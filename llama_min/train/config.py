"""Training settings: one dataclass, its documentation, and how JSON files and flags combine.

Precedence (later wins): the defaults below < `--train-config FILE.json` < command-line flags. A resumed run
starts from the settings saved in `OUT/run.json` instead of the defaults, so only flags given again change it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from ..errors import LlamaMinError
from ..files import read_json

DOC = {
    "config": "model config JSON (ModelArgs fields, params.json form) to train from scratch; a name like "
              "'tiny' means configs/tiny.json",
    "init": "checkpoint to fine-tune (Meta dir, HF dir, .gguf file, llama_min dir): anything load_checkpoint reads",
    "tokenizer": "tokenizer file or dir; default: the --init checkpoint's, or (with --config) a sentencepiece BPE "
                 "trained on the data with the config's vocab_size and saved to OUT/tokenizer.model",
    "data": "training text: .txt (tokenized and packed) or .jsonl ({\"text\": ...} or chat {\"messages\": [...]}, "
            "loss on assistant tokens only); several files are concatenated",
    "out": "run directory: run.json, metrics.jsonl, checkpoints/, final/",
    "max_steps": "optimizer steps in the run; also the length of the LR schedule",
    "batch_size": "windows (sequences) per micro-step, global over all processes (must divide by their number)",
    "grad_accum": "micro-steps per optimizer step: tokens per step = batch_size * grad_accum * seq_len",
    "seq_len": "tokens per window (at most the model's max_seq_len)",
    "lr": "peak learning rate (after warmup)",
    "min_lr_ratio": "the cosine decay ends at lr * min_lr_ratio",
    "warmup_steps": "linear warmup from lr/warmup_steps to lr over this many steps",
    "weight_decay": "AdamW decoupled weight decay on matrices (not on norms or LoRA-frozen weights)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "adam_eps": "AdamW epsilon",
    "grad_clip": "clip the global gradient norm to this (0 = no clipping)",
    "seed": "seeds the model init, LoRA init, data order and dropout",
    "val_fraction": "fraction of the windows (the last ones) held out for validation",
    "eval_every": "evaluate val loss / perplexity and print a sample every N steps (0 = only at the end)",
    "eval_batches": "validation batches (of batch_size windows) per evaluation",
    "sample_prompt": "prompt of the sample printed at each evaluation (default: the start of the data)",
    "sample_tokens": "new tokens in that sample (0 = no sample)",
    "save_every": "write a resumable checkpoint every N steps (0 = only with --stop-after)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "bf16": "bfloat16 autocast over float32 master weights (null = on for a CUDA GPU with bf16, off on CPU: "
            "there it is not bit-exact and its speed depends on the CPU's bf16 support)",
    "grad_checkpointing": "recompute each block's activations in the backward pass: less memory, ~30% more time",
    "fsdp": "under torchrun: shard parameters, gradients and optimizer state (FSDP2 fully_shard) instead of DDP",
    "device": "cpu | cuda | cuda:N (default: the GPU of this process if there is one, else cpu)",
    "lora_rank": "LoRA rank r (0 = full fine-tuning of every weight)",
    "lora_alpha": "LoRA scale numerator: the update is (alpha / r) * B A",
    "lora_dropout": "dropout on the LoRA branch input",
    "lora_targets": "linear layers that get adapters: a comma-separated subset of wq,wk,wv,wo,w1,w2,w3",
}


@dataclass
class TrainConfig:
    config: Optional[str] = None
    init: Optional[str] = None
    tokenizer: Optional[str] = None
    data: list = field(default_factory=list)
    out: Optional[str] = None
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1
    val_fraction: float = 0.05
    eval_every: int = 100
    eval_batches: int = 4
    sample_prompt: Optional[str] = None
    sample_tokens: int = 40
    save_every: int = 0
    keep_checkpoints: int = 1
    bf16: Optional[bool] = None
    grad_checkpointing: bool = False
    fsdp: bool = False
    device: Optional[str] = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"

    def updated(self, values: dict, source: str) -> "TrainConfig":
        """A copy with `values` applied; unknown keys are an error naming `source` ("_doc" is ignored)."""
        known = {f.name: f for f in fields(self)}
        out = asdict(self)
        for key, value in values.items():
            if key.startswith("_"):
                continue
            if key.replace("-", "_") not in known:
                raise LlamaMinError(f"{source}: unknown training setting '{key}' (known: {', '.join(known)})")
            out[key.replace("-", "_")] = value
        if isinstance(out["data"], str):
            out["data"] = [out["data"]]
        return TrainConfig(**out)

    def check(self) -> None:
        """Range checks on the numbers; raise LlamaMinError naming the setting."""
        positive = ("max_steps", "batch_size", "grad_accum", "seq_len")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LlamaMinError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise LlamaMinError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise LlamaMinError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("warmup_steps", "eval_every", "save_every", "sample_tokens", "lora_rank", "eval_batches"):
            if getattr(self, name) < 0:
                raise LlamaMinError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise LlamaMinError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.data:
            raise LlamaMinError("no training data: give --data FILE")
        if bool(self.config) == bool(self.init):
            raise LlamaMinError("give exactly one of --config (train from scratch) or --init (fine-tune a checkpoint)")
        if not self.out:
            raise LlamaMinError("no run directory: give --out DIR")
        if self.lora_rank:
            from .lora import parse_targets

            parse_targets(self.lora_targets)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_json_file(path, what: str) -> dict:
    """A JSON object from a file (`llama_min.files.read_json`: every failure is a LlamaMinError naming it)."""
    return read_json(path, what)


def resolve_model_config(name_or_path: str) -> Path:
    """A model config path; a bare name ('tiny', 'stories15M') means the bundled configs/<name>.json.

    The bundled configs are the checkout's top-level configs/ folder, which an installed wheel carries as the
    package `llama_min.configs`. A name that is neither a file nor a bundled config comes back unchanged (the
    reader then says the file is missing).
    """
    path = Path(name_or_path)
    if path.exists() or path.suffix == ".json":
        return path
    for bundled in _bundled_candidates(f"{name_or_path}.json"):
        if bundled.is_file():
            return bundled
    return path


def _bundled_candidates(file_name: str) -> list:
    """Where a bundled config may live: the installed package data, then a checkout's configs/ folder."""
    from importlib import resources

    candidates = []
    try:  # installed: site-packages/llama_min/configs/ (the package llama_min.configs)
        candidates.append(Path(str(resources.files("llama_min.configs").joinpath(file_name))))
    except ModuleNotFoundError:  # a checkout: configs/ sits beside llama_min/, not inside it
        pass
    candidates.append(Path(__file__).resolve().parents[2] / "configs" / file_name)
    return candidates
