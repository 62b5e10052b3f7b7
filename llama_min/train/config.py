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


def setting(default, doc: str):
    """A TrainConfig field: its default and its documentation, side by side."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class TrainConfig:
    """Every training setting: its type, its default and its documentation (DOC, the flags' help)."""

    config: Optional[str] = setting(None, "model config JSON (ModelArgs fields, params.json form) to train from "
                                          "scratch; a name like 'tiny' means configs/tiny.json")
    init: Optional[str] = setting(None, "checkpoint to fine-tune (-m/--ckpt/--init on the command line): any "
                                        "file or folder load_checkpoint reads")
    tokenizer: Optional[str] = setting(None, "tokenizer file or dir; default: the --init checkpoint's, or (with "
                                             "--config) a sentencepiece BPE trained on the data with the config's "
                                             "vocab_size and saved to OUT/tokenizer.model")
    data: list = field(default_factory=list, metadata={"doc": "training text: .txt (tokenized and packed) or "
                                                              ".jsonl ({\"text\": ...} or chat {\"messages\": [...]}, "
                                                              "loss on assistant tokens only); several files are "
                                                              "concatenated"})
    out: Optional[str] = setting(None, "run directory: run.json, metrics.jsonl, checkpoints/, final/")
    rope_scaling: Optional[str] = setting(None, "RoPE scaling of the model trained, TYPE:FACTOR[,key=value...] "
                                                "(TYPE linear, dynamic, yarn or llama3; keys orig, beta_fast, "
                                                "beta_slow, attention_factor, mscale, mscale_all_dim, truncate): "
                                                "replaces the config's or checkpoint's, and final/params.json "
                                                "keeps it (e.g. linear:4 to fine-tune for 4x the window)")
    max_steps: int = setting(1000, "optimizer steps in the run; also the length of the LR schedule")
    batch_size: int = setting(8, "windows (sequences) per micro-step, global over all processes (must divide by "
                                 "their number)")
    grad_accum: int = setting(1, "micro-steps per optimizer step: tokens per step = batch_size * grad_accum * "
                                 "seq_len")
    seq_len: int = setting(256, "tokens per window (at most the model's max_seq_len)")
    lr: float = setting(3e-4, "peak learning rate (after warmup)")
    min_lr_ratio: float = setting(0.1, "the cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = setting(50, "linear warmup from lr/warmup_steps to lr over this many steps")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay on matrices (not on norms or LoRA-frozen "
                                       "weights)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = no clipping)")
    seed: int = setting(1, "seeds the model init, LoRA init, data order and dropout")
    val_fraction: float = setting(0.05, "fraction of the windows (the last ones) held out for validation")
    eval_every: int = setting(100, "evaluate val loss / perplexity and print a sample every N steps (0 = only at "
                                   "the end)")
    eval_batches: int = setting(4, "validation batches (of batch_size windows) per evaluation")
    sample_prompt: Optional[str] = setting(None, "prompt of the sample printed at each evaluation (default: the "
                                                 "start of the data)")
    sample_tokens: int = setting(40, "new tokens in that sample (0 = no sample)")
    save_every: int = setting(0, "write a resumable checkpoint every N steps (0 = only with --stop-after)")
    keep_checkpoints: int = setting(1, "how many recent checkpoints to keep")
    bf16: Optional[bool] = setting(None, "bfloat16 autocast over float32 master weights (null = on for a CUDA GPU "
                                         "with bf16, off on CPU: there it is not bit-exact and its speed depends "
                                         "on the CPU's bf16 support)")
    grad_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass: less "
                                              "memory, ~30% more time")
    fsdp: bool = setting(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2 "
                                "fully_shard) instead of DDP")
    device: Optional[str] = setting(None, "cpu | cuda | cuda:N (default: the GPU of this process if there is one, "
                                          "else cpu)")
    lora_rank: int = setting(0, "LoRA rank r (0 = full fine-tuning of every weight)")
    lora_alpha: float = setting(16.0, "LoRA scale numerator: the update is (alpha / r) * B A")
    lora_dropout: float = setting(0.0, "dropout on the LoRA branch input")
    lora_targets: str = setting("wq,wk,wv,wo,w1,w2,w3", "linear layers that get adapters: a comma-separated subset "
                                                        "of wq,wk,wv,wo,w1,w2,w3")

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
        if self.rope_scaling is not None:
            from ..formats.common import parse_rope_scaling

            parse_rope_scaling(self.rope_scaling, "rope_scaling (--rope-scaling)")
        if self.lora_rank:
            from .lora import parse_targets

            parse_targets(self.lora_targets)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


DOC = {f.name: f.metadata["doc"] for f in fields(TrainConfig)}  # setting -> its help text


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
