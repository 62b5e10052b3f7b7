"""Run state on disk and across processes: resumable checkpoints, metrics, tokenizer files, torchrun ranks.

  Dist                  this process's rank in a torchrun job; barrier, sums and broadcasts (no-ops alone)
  save_state            checkpoints/step_N/: trainable weights + AdamW state + every rank's RNG (safetensors)
                        and state.json (step, data position, settings); written to a temp dir, renamed when
                        complete, older ones deleted after: a kill at any moment leaves a usable checkpoint
  load_state            the inverse, re-sharding for FSDP2; `list_checkpoints` finds the complete ones
  truncate_metrics      on resume, drop metrics lines written after the checkpoint (no duplicate steps)
  tokenizer_files       a tokenizer's files under the names `load_tokenizer(dir)` finds (GGUF ones written out)

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .files import atomic_write

CKPT_DIR = "checkpoints"


def log(msg: str) -> None:
    if Dist.rank == 0:
        print(msg, file=sys.stderr, flush=True)


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank, world, local_rank = 0, 1, 0

    @classmethod
    def setup(cls, device_flag) -> torch.device:
        """Join the torchrun process group (gloo on CPU, nccl on GPUs) and pick this process's device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cls.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and (device_flag or "cuda").startswith("cuda")
        device = torch.device(device_flag or (f"cuda:{cls.local_rank}" if cuda else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", cls.local_rank)
        if world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if dist.is_initialized():
            cls.rank, cls.world = dist.get_rank(), dist.get_world_size()
        return device

    @staticmethod
    def barrier():
        if dist.is_initialized():
            dist.barrier()

    @staticmethod
    def all_sum(t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(t)
        return t

    @staticmethod
    def broadcast_object(obj):
        """rank 0's `obj` on every rank."""
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @staticmethod
    def teardown():
        if dist.is_initialized():
            dist.destroy_process_group()


def trainable_named(model: nn.Module) -> list:
    """(name, parameter) of the trainable parameters, names as in the unwrapped model."""
    return [(n.removeprefix("module."), p) for n, p in model.named_parameters() if p.requires_grad]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (an FSDP2 shard is all-gathered: every rank must call this)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: sharded the same way for an FSDP2 parameter, else on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements)
    return full


def atomic_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def finish_dir(path: Path) -> None:
    """Make a temp dir's files durable and readable like normal files (mkdtemp/mkstemp give 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in [*path.iterdir(), path]:
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------- resumable checkpoints


def rng_states(device: torch.device) -> dict:
    """Every rank's torch RNG state (CPU, and CUDA when used), gathered to all ranks."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    states = [mine]
    if dist.is_initialized():
        states = [None] * Dist.world
        dist.all_gather_object(states, mine)
    return {f"rng.{kind}.{r}": t for r, s in enumerate(states) for kind, t in s.items()}


def save_state(run_dir: Path, step: int, model, opt, state: dict, device, keep: int) -> None:
    """Write checkpoints/step_N/ (model.safetensors, optimizer.safetensors, state.json) atomically.

    The files go to a temp dir that is renamed into place once complete; older checkpoints beyond `keep`
    are deleted only after that, so a kill at any moment leaves the last complete checkpoint usable.
    Every rank must call this (FSDP shards are gathered); only rank 0 writes.
    """
    from safetensors.torch import save_file

    weights = {name: full_tensor(p) for name, p in trainable_named(model)}
    optim = {}
    for name, p in trainable_named(model):
        for key, value in opt.state.get(p, {}).items():
            optim[f"{name}.{key}"] = full_tensor(value) if value.ndim else value.detach().cpu().reshape(())
    rng = rng_states(device)
    if Dist.rank == 0:
        root = run_dir / CKPT_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step_{step:08d}-"))
        save_file(weights, str(tmp / "model.safetensors"))
        save_file({**optim, **rng}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": Dist.world}, indent=2))
        finish_dir(tmp)
        if final.exists():  # the same step saved again (stop-after on a resumed run): swap it out
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    Dist.barrier()


def list_checkpoints(run_dir: Path) -> list:
    """Complete checkpoint dirs, oldest first (temp dirs of an interrupted save are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / "state.json").is_file())


def load_state(ckpt: Path, model, opt, device) -> dict:
    """Restore weights, AdamW state and this rank's RNG from `ckpt`; return its state.json."""
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    weights = load_file(str(ckpt / "model.safetensors"))
    extra = load_file(str(ckpt / "optimizer.safetensors"))
    with torch.no_grad():
        for name, p in trainable_named(model):
            if name not in weights:
                raise ValueError(f"{ckpt}: no weights for '{name}' (was it saved by a different run setup?)")
            p.copy_(like(p, weights[name]))
            keys = [k for k in extra if k.startswith(name + ".") and "." not in k[len(name) + 1:]]
            if keys:
                opt.state[p] = {k[len(name) + 1:]: extra[k].clone() if extra[k].ndim == 0 else like(p, extra[k])
                                for k in keys}
    if state.get("world_size") == Dist.world:
        torch.set_rng_state(extra[f"rng.cpu.{Dist.rank}"])
        if device.type == "cuda" and f"rng.cuda.{Dist.rank}" in extra:
            torch.cuda.set_rng_state(extra[f"rng.cuda.{Dist.rank}"], device)
    else:
        log(f"note: {ckpt} was written by {state.get('world_size')} processes, now {Dist.world}: "
            "RNG states (only dropout uses them) are reseeded")
        torch.manual_seed(state["step"] * 7919 + Dist.rank)
    return state


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics lines of steps <= last_step (one per step), dropping what a killed run added after."""
    if not path.is_file():
        return
    kept, seen = [], set()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(rec, dict) and rec.get("step", math.inf) <= last_step and rec["step"] not in seen:
            seen.add(rec["step"])
            kept.append(line)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- tokenizers


def tokenizer_files(tok, source) -> dict:
    """The files that carry `tok` (loaded from `source`) into a checkpoint dir: {file name: bytes}.

    Names are the ones `load_tokenizer(dir)` looks for: a sentencepiece or tiktoken file becomes
    `tokenizer.model`, a tokenizer.json keeps its config files beside it; a tokenizer that lives inside
    a GGUF file is written out (sentencepiece -> tokenizer.model; byte-level BPE -> tokenizer.json +
    tokenizer_config.json with the BOS/EOS names and the chat template).
    """
    from .tokenizer import find_tokenizer_file

    src = find_tokenizer_file(source)
    data = src.read_bytes()
    if data[:4] != b"GGUF":
        if tok.kind != "tokenizers":
            return {"tokenizer.model": data, **_template_file(tok)}
        side = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "chat_template.jinja")
        return {"tokenizer.json": data, **{n: (src.parent / n).read_bytes() for n in side if (src.parent / n).is_file()}}
    if tok.kind == "sentencepiece":
        return {"tokenizer.model": tok.sp.serialized_model_proto(), **_template_file(tok)}
    from .gguf_file import read_gguf_metadata

    template = read_gguf_metadata(src, prefix="tokenizer.").get("tokenizer.chat_template")
    config = {k: tok.tk.id_to_token(i) for k, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)) if i >= 0}
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tok.tk.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def _template_file(tok) -> dict:
    """The chat template beside a tokenizer.model, as `load_tokenizer` finds it: chat_template.jinja."""
    return {"chat_template.jinja": tok.chat_template.encode("utf-8")} if tok.chat_template else {}
