"""What every format reader shares: tensor access (safetensors, weights-only torch files), the shapes a
model needs, and the q/k row permutation between Hugging Face's and Meta's RoPE layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import LlamaMinError
from ..model import ModelArgs


def expected_shapes(args: ModelArgs) -> dict:
    """Every tensor a model with these args needs, Meta names -> shape."""
    d, hd, F = args.dim, args.hd, args.ffn_hidden
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,), "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
            p + "attention.wq.weight": (args.n_heads * hd, d), p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d), p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (F, d), p + "feed_forward.w3.weight": (F, d),
            p + "feed_forward.w2.weight": (d, F),
        })
    return shapes


def check_state_dict(args: ModelArgs, sd: dict, source) -> None:
    """Raise a ValueError naming the file and key for a missing, unexpected or misshapen tensor."""
    want = expected_shapes(args)
    for key, shape in want.items():
        if key not in sd:
            raise LlamaMinError(f"{source}: missing tensor '{key}' (expected shape {list(shape)})")
        if tuple(sd[key].shape) != shape:
            raise LlamaMinError(f"{source}: tensor '{key}' has shape {list(sd[key].shape)}, expected {list(shape)}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise LlamaMinError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} unknown keys)")


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation: per head, HF row j*hd/2 + i holds Meta row 2i + j.

    HF implements RoPE as "rotate half" (feature i pairs with i + hd/2), Meta pairs 2i with 2i+1.
    View the rows as (heads, 2, hd/2), swap the last two axes, flatten. Use K heads for wk.
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_meta_qk`: per head, view rows as (hd/2, 2), swap, flatten."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_inplace(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """hf_to_meta_qk written back into w's own memory (a memory-mapped private page becomes owned)."""
    try:
        return w.copy_(hf_to_meta_qk(w, n_heads))
    except RuntimeError:  # read-only storage
        return hf_to_meta_qk(w, n_heads).clone()


def cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def safetensors_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise LlamaMinError(f"{path}: not a readable safetensors file ({e})") from None


def torch_load(path: Path) -> dict:
    """A .pth/.bin state dict, memory-mapped, refusing anything but tensors (never unpickles code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise LlamaMinError(f"{path}: cannot load as a weights-only PyTorch file ({e})") from None


def load_safetensors(path: Path, dtype) -> dict:
    """Tensors of one safetensors file, memory-mapped (copy-on-write) by the safetensors library."""
    f = safetensors_open(path)
    try:
        return {k: cast(f.get_tensor(k), dtype) for k in f.keys()}
    except Exception as e:  # a truncated file fails here
        raise LlamaMinError(f"{path}: cannot read tensors ({e})") from None
