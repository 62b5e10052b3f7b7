"""Getting a run ready: read and check every input (data, model config or checkpoint, tokenizer), then
build the model to train. Nothing here writes a file: the run folder is created only once all of this passed.

  prepare_inputs       data files -> records; model args (config, --init checkpoint, or the final/ a resumed
                       finished run continues from); the tokenizer
                       (--tokenizer, the checkpoint's, this run's, or a sentencepiece BPE trained on the data);
                       token stream -> PackedData windows
  check_memory         the memory preflight of a training step (memory.py), as soon as the model's shape
                       is known: before a tokenizer is trained or anything is built
  build_model          the Transformer: random init (from scratch) or the loaded weights; LoRA adapters;
                       gradient checkpointing
  init_weights         GPT-2 style init for training from scratch
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..checkpoint import build_transformer, load_checkpoint
from ..formats.common import rope_override
from .data import PackedData, encode_records, read_records, train_sentencepiece
from ..errors import LlamaMinError
from ..files import read_json
from .lora import apply_lora
from .memory import check_training_memory
from ..model import ModelArgs, Transformer
from .config import TrainConfig, resolve_model_config
from .dist import Dist, log
from ..text.tokenizer import tokenizer_files


@dataclass
class RunInputs:
    """Everything read from the inputs of a run, checked, before anything is written."""

    args: ModelArgs
    tok: object                # llama_min.text.tokenizer.Tokenizer
    tok_files: list            # files copied into final/ beside the weights
    tok_blobs: dict            # {path in the run folder: bytes}, written when the run starts
    chat: bool                 # the data holds chat records (samples are chat replies)
    data: PackedData
    init_sd: Optional[dict]    # the tensors to start from: --init's, or `base`'s (None: random init)


def prepare_inputs(cfg: TrainConfig, run_dir: Path, resume: bool, base: Optional[Path] = None,
                   device: Optional[torch.device] = None) -> RunInputs:
    """Read the data, the model's args and the tokenizer; tokenize and pack. Raises LlamaMinError early.

    `base`: a checkpoint whose weights replace --config / --init's (final/ when a finished run continues).
    `device`: check that a training step fits its free memory as soon as the model's shape is known.
    """
    records = [r for path in cfg.data for r in read_records(path)]
    args, init_sd = model_args(cfg, base)
    if device is not None and args.vocab_size > 0:
        check_memory(args, cfg, device, init_sd)
    tok, tok_files, blobs = choose_tokenizer(cfg, args, records, run_dir, resume)
    if args.vocab_size <= 0:  # params.json with vocab_size -1: take it from the tokenizer
        args.vocab_size = tok.n_words
        if device is not None:
            check_memory(args, cfg, device, init_sd)
    if tok.n_words > args.vocab_size:
        raise LlamaMinError(f"the tokenizer has {tok.n_words} tokens but the model's vocab_size is "
                            f"{args.vocab_size}; give a --tokenizer that matches the model")
    ids, mask = encode_records(tok, records)
    data = PackedData.build(ids, mask, cfg.seq_len, cfg.val_fraction, source=", ".join(cfg.data))
    return RunInputs(args, tok, tok_files, blobs, any("messages" in r for r in records), data, init_sd)


def check_memory(args: ModelArgs, cfg: TrainConfig, device: torch.device, init_sd: Optional[dict]) -> None:
    """The memory preflight (memory.py), before the tokenizer is trained or the model built. A checkpoint
    already loaded into CPU memory becomes the model's weights: those bytes are counted as available."""
    held = 0
    if init_sd is not None and device.type == "cpu":
        held = sum(t.numel() * t.element_size() for t in init_sd.values() if t.dtype == torch.float32)
    check_training_memory(args, cfg, device, Dist.world, held)


def model_args(cfg: TrainConfig, base: Optional[Path] = None) -> tuple:
    """(ModelArgs, the state dict of `base` or --init, or None from scratch); --seq-len must fit the model.

    --rope-scaling replaces the config's or checkpoint's scaling (common.rope_override: dynamic's M and yarn's
    L0 default to its trained window, else its max_seq_len); final/params.json then carries it, and the
    trained window: --seq-len for a model trained from scratch, the larger of the two after a fine-tune."""
    if base is not None:
        (args, init_sd), source = load_checkpoint(base), str(base)
    elif cfg.config:
        path = resolve_model_config(cfg.config)
        args, init_sd, source = ModelArgs.from_dict(read_json(path, "model config")), None, str(path)
    else:
        (args, init_sd), source = load_checkpoint(cfg.init), cfg.init
    if base is None and cfg.config:  # from scratch: the only positions the model will know are --seq-len's
        args.trained_window = cfg.seq_len
    rope_override(args, cfg.rope_scaling, "--rope-scaling")
    args.trained_window = max(args.trained_window or 0, cfg.seq_len)  # what final/params.json says it saw
    if cfg.seq_len > args.max_seq_len and cfg.rope_scaling:  # a longer window is what the scaling is for
        args.max_seq_len = cfg.seq_len
    if cfg.seq_len > args.max_seq_len:
        raise LlamaMinError(f"--seq-len {cfg.seq_len} is larger than the model's max_seq_len {args.max_seq_len} "
                            f"({source}); to train past it, give a --rope-scaling (e.g. linear:"
                            f"{-(-cfg.seq_len // args.max_seq_len)})")
    return args, init_sd


def choose_tokenizer(cfg: TrainConfig, args: ModelArgs, records: list, run_dir: Path, resume: bool) -> tuple:
    """(tokenizer, files for final/, {run-folder path: bytes} to write at the start).

    The tokenizer is --tokenizer, else the --init checkpoint's, else (resuming) the one this run trained,
    else a sentencepiece BPE trained here on the data (rank 0 trains it, every rank gets the bytes).
    """
    from ..text.tokenizer import load_tokenizer

    own = run_dir / "tokenizer.model"
    path = cfg.tokenizer or cfg.init or (own if resume and own.is_file() else None)
    if path == own:  # resuming a run whose tokenizer was trained on its data
        return load_tokenizer(own), [own], {}
    if path is not None:
        tok = load_tokenizer(path)
        blobs = {run_dir / "tokenizer" / name: blob for name, blob in tokenizer_files(tok, path).items()}
        return tok, list(blobs), blobs
    if args.vocab_size <= 0:
        raise LlamaMinError(f"{cfg.config}: vocab_size must be set to train a tokenizer on the data")
    log(f"training a sentencepiece BPE tokenizer (vocab {args.vocab_size}, byte fallback) on the data; "
        f"saving it to {own}")
    proto = train_sentencepiece([r.get("text", "") for r in records], args.vocab_size) if Dist.rank == 0 else None
    proto = Dist.broadcast_object(proto)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(proto)
        tok = load_tokenizer(Path(tmp) / "tokenizer.model")
    return tok, [own], {own: proto}


def build_model(cfg: TrainConfig, inputs: RunInputs, device: torch.device) -> Transformer:
    """The plain Transformer to train (float32 master weights), seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)
    if inputs.init_sd is None:
        with torch.device("meta"):
            model = Transformer(inputs.args)
        model.to_empty(device=device)
        model.tie_weights()  # to_empty gives each module its own new tensor: tie them again
        init_weights(model)
    else:
        model = build_transformer(inputs.args, inputs.init_sd, device=device, dtype=torch.float32)
        model.tie_weights()
        inputs.init_sd = None  # the model holds the tensors now
    if cfg.lora_rank:
        n = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        log(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {n:,} trainable parameters")
    else:
        model.requires_grad_(True)
    model.freqs_cis = model.freqs_cis.to(device)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model


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

    PyTorch's composable `checkpoint` registers a forward pre-hook and a forward hook on each block
    (non-reentrant checkpointing, RNG state kept for dropout): the module, its class, its `forward` and
    its parameter names are unchanged, so state dicts and run folders are the same with or without it.
    Called on the plain model, before `wrap_model` applies DDP or `fully_shard` (FSDP2's hooks are
    prepended and appended around these, so parameters are all-gathered for the recomputation too).
    Without autograd (evaluation, samples) nothing is saved and there is nothing to recompute.
    """
    from torch.distributed._composable import checkpoint

    for layer in model.layers:
        checkpoint(layer)
