"""llama.cpp's GGUF format: metadata + tensors in one file; q/k rows are already in Meta's order.

This module turns GGUF tensors into float tensors (dequantizing quantized blocks with the `gguf`
package), one tensor at a time from the memory-mapped file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..errors import LlamaMinError
from ..model import ModelArgs
from .common import cast

GGUF_TO_META = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


GGUF_LAYER_TO_META = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}


def args_from_gguf(meta: dict) -> ModelArgs:
    arch = meta.get("general.architecture", "llama")
    if arch != "llama":
        raise LlamaMinError(f"GGUF architecture '{arch}' is not supported (expected 'llama')")

    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    rot = get("rope.dimension_count")
    return ModelArgs(
        dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        vocab_size=int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or -1)),
        hidden_dim=int(get("feed_forward_length")),
        head_dim=int(get("attention.key_length", rot or dim // n_heads)),
        norm_eps=float(f'{get("attention.layer_norm_rms_epsilon", 1e-5):.7g}'),  # stored as float32
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_seq_len=min(int(get("context_length", 2048)), 8192),
    )


def gguf_to_meta_name(name: str) -> Optional[str]:
    if name == "rope_freqs.weight":
        return None
    base, _, suffix = name.rpartition(".")
    if base in GGUF_TO_META:
        return f"{GGUF_TO_META[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in GGUF_LAYER_TO_META:
        return f"layers.{m.group(1)}.{GGUF_LAYER_TO_META[m.group(2)]}.{suffix}"
    raise LlamaMinError(f"unknown GGUF tensor '{name}'")


def gguf_tensor(data, dims: tuple, ggml_type: int, offset: int, dtype) -> torch.Tensor:
    """Dequantize one GGUF tensor (at `offset` in the memory-mapped file `data`) to Meta's row-major shape."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(ggml_type)
    shape = tuple(int(s) for s in reversed(dims))  # GGUF lists dims innermost-first
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_bytes = int(np.prod(shape)) * type_size // block
    raw = data[offset : offset + n_bytes]
    if len(raw) != n_bytes:
        raise LlamaMinError("tensor data runs past the end of the file (truncated download?)")
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
    else:  # blocks of bytes, one row of blocks per output row
        arr = raw.reshape(-1, shape[-1] * type_size // block)
    arr = dequantize(arr, qtype).reshape(shape)
    return cast(torch.from_numpy(np.array(arr, dtype=np.float32, copy=False)), dtype or torch.float32)


def load_gguf(path: Path, dtype):
    import numpy as np
    from tqdm import tqdm

    from ..gguf_file import read_gguf_tensor_infos

    meta, infos = read_gguf_tensor_infos(path)
    args = args_from_gguf(meta)
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: float32 tensors stay views
    sd = {}
    for name, dims, ggml_type, offset in tqdm(infos, desc="dequantizing", unit="tensor", leave=False, disable=None):
        try:
            t = gguf_tensor(data, dims, ggml_type, offset, dtype)
            if name == "rope_freqs.weight":  # Llama 3.1+ scaling as per-pair divisors of theta_i
                args.rope_freq_divisors = [float(x) for x in t.float()]
                continue
            sd[gguf_to_meta_name(name)] = t
        except (ValueError, KeyError, NotImplementedError) as e:
            raise LlamaMinError(f"{path}: tensor '{name}': {e}") from None
    if "output.weight" not in sd:
        args.tie_word_embeddings = True
    if args.vocab_size <= 0:
        args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    return args, sd
