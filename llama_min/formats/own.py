"""llama_min's own format: params.json (ModelArgs) + model.safetensors with Meta's names and layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..files import atomic_write, read_json
from ..model import ModelArgs
from .common import args_from_params, load_safetensors


def load_own(path: Path, dtype):
    args = args_from_params(read_json(path / "params.json", "params.json"), path / "params.json")
    return args, load_safetensors(path / "model.safetensors", dtype)


def save_checkpoint(out_dir, args: ModelArgs, state_dict: dict, tokenizer_files=()) -> Path:
    """Write the own format: model.safetensors (Meta names), then params.json, then tokenizer files.

    Every file is written atomically; params.json comes after the weights, so a directory with a
    params.json always holds complete weights. Tied output weights are stored once.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if args.tie_word_embeddings:
        tensors.pop("output.weight", None)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "llama_min"}))
    atomic_write(out / "params.json", lambda tmp: Path(tmp).write_text(json.dumps(args.to_dict(), indent=2)))
    for src in tokenizer_files:
        src = Path(src)
        atomic_write(out / src.name, lambda tmp: shutil.copyfile(src, tmp))
    return out
