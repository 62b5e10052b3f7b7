"""Meta's format: params.json + consolidated.NN.pth (model-parallel shards, merged here on the CPU).

Shard axes: column-parallel layers (wq wk wv w1 w3 output) were split by rows (dim 0), row-parallel
ones (wo w2) by columns (dim 1); the embedding by columns in Llama 1/2 and by rows in Llama 3 (told
apart by its shape); norms are replicated. Pickles are read weights-only and memory-mapped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LlamaMinError
from ..files import read_json
from .common import args_from_params, cast, torch_weights

SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _merge_shards(key: str, parts: list, dim: int, files) -> torch.Tensor:
    """Concatenate one tensor's model-parallel pieces along the axis its layer was split on."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].ndim < 2:  # norms are replicated on every shard
        return parts[0]
    kind = key.split(".")[-2]
    if kind == "tok_embeddings":  # Llama 1/2 split it by columns (dim 1), Llama 3 by rows (dim 0)
        axis = 0 if parts[0].shape[1] == dim else 1
    else:
        axis = SHARD_DIM.get(kind)
        if axis is None:
            raise LlamaMinError(f"{files[0].parent}: no known shard merge rule for '{key}'")
    if any(p.shape[:axis] + p.shape[axis + 1:] != parts[0].shape[:axis] + parts[0].shape[axis + 1:] for p in parts):
        shapes = [list(p.shape) for p in parts]
        raise LlamaMinError(f"{files[0].parent}: shards disagree on '{key}': shapes {shapes}")
    return torch.cat(parts, dim=axis)


def load_meta(path: Path, dtype):
    args = args_from_params(read_json(path / "params.json", "params.json"), path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    shards = [torch_weights(f) for f in files]
    keys = [k for k in shards[0] if k != "rope.freqs"]  # rope.freqs (Llama 1/2) is recomputed
    for f, s in zip(files[1:], shards[1:]):
        if set(k for k in s if k != "rope.freqs") != set(keys):
            raise LlamaMinError(f"{f}: shards disagree: its tensor names differ from {files[0].name}")
    sd = {k: cast(_merge_shards(k, [s[k] for s in shards], args.dim, files), dtype) for k in keys}
    if args.vocab_size <= 0 and "tok_embeddings.weight" in sd:
        args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    return args, sd
