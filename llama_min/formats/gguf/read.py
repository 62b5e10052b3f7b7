"""llama.cpp's GGUF format: metadata + tensors in one file; q/k rows are already in Meta's order.

This module turns GGUF tensors into float tensors (dequantizing quantized blocks with the `gguf`
package), one tensor at a time from the memory-mapped file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import torch

from ...errors import LlamaMinError
from ...model import ModelArgs
from ..common import ConfigReader, build_args, cast, one_line, rope_scaling_fields, zero_is_none

GGUF_TO_META = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


GGUF_LAYER_TO_META = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}


# ModelArgs field -> GGUF key, so ModelArgs' own checks speak the file's words
GGUF_NAMES = {"dim": "llama.embedding_length", "n_layers": "llama.block_count",
              "n_heads": "llama.attention.head_count", "n_kv_heads": "llama.attention.head_count_kv",
              "hidden_dim": "llama.feed_forward_length", "head_dim": "llama.attention.key_length"}


def args_from_gguf(meta: dict, source="GGUF file") -> ModelArgs:
    """ModelArgs from GGUF metadata (`llama.*` keys), every value type- and range-checked.

    Refused: another `general.architecture`, mixture-of-experts (`llama.expert_count` > 0), RoPE scalings
    other than none, linear and yarn (gguf_rope_scaling; Llama 3.1's comes as the `rope_freqs` tensor).
    """
    top = ConfigReader(meta, source)
    arch = top.text("general.architecture", "llama")
    if arch != "llama":
        raise top.error("general.architecture", arch, "\"llama\" (other architectures are not Llama's math)")
    r = ConfigReader(meta, source, "llama.")
    if r.int("expert_count", 0, minimum=0) > 0:
        raise r.error("expert_count", meta["llama.expert_count"], "0 (mixture-of-experts is not Llama)")
    context = r.int("context_length", None)
    scaling = gguf_rope_scaling(r, context)
    n_heads, dim = r.int("attention.head_count"), r.int("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) and tokens else -1
    eps = r.number("attention.layer_norm_rms_epsilon", 1e-5)
    args = build_args(
        source, GGUF_NAMES,
        dim=dim, n_layers=r.int("block_count"), n_heads=n_heads,
        n_kv_heads=r.int("attention.head_count_kv", n_heads), vocab_size=r.int("vocab_size", n_tokens, minimum=-1),
        hidden_dim=r.int("feed_forward_length"), head_dim=r.int("attention.key_length", None),
        norm_eps=float(f"{eps:.7g}"),  # stored as float32: 1e-5 reads back as 9.99999974738e-06
        rope_theta=r.number("rope.freq_base", 10000.0),
        max_seq_len=min(context or 2048, 8192), trained_window=context,
        **scaling,
    )
    for key in ("rope.dimension_count", "attention.value_length"):  # partial RoPE, v heads unlike k heads
        value = r.int(key, None)
        if value is not None and value != args.hd:
            raise r.error(key, value, f"the head dimension {args.hd} (as in Llama)")
    n_ids = args.vocab_size if args.vocab_size > 0 else n_tokens
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        value = top.int(key, None, minimum=0)
        if value is not None and n_ids > 0 and value >= n_ids:
            raise top.error(key, value, f"a token id below the vocabulary size {n_ids}")
    return args


GGUF_ROPE_TYPES = ("none", "linear", "yarn")  # what llama.cpp's converter writes for a Llama model


def gguf_rope_scaling(r: ConfigReader, context_length: Optional[int]) -> dict:
    """ModelArgs fields for `llama.rope.scaling.*` (llama.cpp's keys), through common.rope_scaling_fields.

    As llama.cpp reads them: a missing type with a factor (or the old `rope.scale_linear`) is linear, a
    factor of 0 is 1; yarn's L0 (`original_context_length`) defaults to the context length. yarn's magnitude:
    `yarn_attn_factor` (where llama.cpp's converter puts transformers' attention_factor) else the default
    from the factor (with `yarn_log_multiplier` as mscale_all_dim, mscale 1), times `attn_factor` (llama.cpp's
    multiplier). `yarn_beta_fast` / `yarn_beta_slow` as written (llama.cpp's own Llama graph uses 32 and 1
    whatever they say). `finetuned` says nothing the math needs. llama.cpp has no dynamic scaling.
    """
    from ...model import yarn_attention_factor

    scaled = ConfigReader(r.data, r.source, r.prefix + "rope.scaling.")
    factor = zero_is_none(scaled, "factor") or zero_is_none(r, "rope.scale_linear")
    kind = scaled.text("type", "linear" if factor and factor != 1 else "none")
    scaled.flag("finetuned", False)
    if kind not in GGUF_ROPE_TYPES:
        names = ", ".join(f'"{t}"' for t in GGUF_ROPE_TYPES)
        raise scaled.error("type", kind, f"one of {names} (llama.cpp's RoPE scalings for a Llama model; others "
                                         "are not supported)")
    if kind == "none":
        return {}
    desc = {"rope_type": kind, "factor": factor or 1.0}
    if kind == "yarn":
        log_mul = zero_is_none(scaled, "yarn_log_multiplier")
        desc.update(original_max_position_embeddings=scaled.int("original_context_length", None),
                    beta_fast=zero_is_none(scaled, "yarn_beta_fast"), beta_slow=zero_is_none(scaled, "yarn_beta_slow"))
        magnitude = scaled.number("yarn_attn_factor", None) or yarn_attention_factor(
            desc["factor"], None, 1.0 if log_mul else None, log_mul)
        multiplier = scaled.number("attn_factor", 1.0)
        if scaled.raw("yarn_attn_factor", None) is not None or multiplier != 1.0 or log_mul:
            desc["attention_factor"] = magnitude * multiplier
    return rope_scaling_fields(desc, r.source, context_length, within=scaled.prefix)


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


INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # ggml tensor types holding integers: not weights


def gguf_tensor(data, dims: tuple, ggml_type: int, offset: int, dtype) -> torch.Tensor:
    """Dequantize one GGUF tensor (at `offset` in the memory-mapped file `data`) to Meta's row-major shape."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(ggml_type)
    if qtype.name in INTEGER_TYPES:
        raise LlamaMinError(f"ggml type {qtype.name} holds integers, expected floating point or a quantized type")
    shape = tuple(int(s) for s in reversed(dims))  # GGUF lists dims innermost-first
    if not shape or min(shape) < 1:
        raise LlamaMinError(f"shape {list(shape)}: expected at least one dimension, each >= 1")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise LlamaMinError(f"rows of {shape[-1]} values do not fill whole {qtype.name} blocks of {block}")
    n_bytes = math.prod(shape) * type_size // block
    raw = data[offset : offset + n_bytes]
    if len(raw) != n_bytes:
        raise LlamaMinError("tensor data runs past the end of the file (truncated download?)")
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
    else:  # blocks of bytes, one row of blocks per output row
        arr = raw.reshape(-1, shape[-1] * type_size // block)
    arr = dequantize(arr, qtype).reshape(shape)
    return cast(torch.from_numpy(np.array(arr, dtype=np.float32, copy=False)), dtype or torch.float32)


def _read_infos(path: Path):
    """(metadata, tensor infos); a damaged header is one LlamaMinError naming the file."""
    from ...files.gguf import read_gguf_tensor_infos

    try:
        return read_gguf_tensor_infos(path)
    except (ValueError, OSError, OverflowError, MemoryError) as e:
        msg = one_line(e)
        raise LlamaMinError(msg if str(path) in msg else f"{path}: not a readable GGUF file ({msg})") from None


def _rope_divisors(t: torch.Tensor, args: ModelArgs, path: Path) -> list:
    """Llama 3.1+ scaling stored as per-pair divisors of theta_i: hd/2 positive finite numbers."""
    divisors = [float(x) for x in t.float().flatten()]
    if len(divisors) != args.hd // 2 or not all(0 < d < math.inf for d in divisors):
        raise LlamaMinError(f"{path}: tensor 'rope_freqs.weight': expected {args.hd // 2} positive finite "
                            f"divisors (head dim / 2), found {len(divisors)} values")
    return divisors


def load_gguf(path: Path, dtype):
    import numpy as np
    from tqdm import tqdm

    meta, infos = _read_infos(path)
    args = args_from_gguf(meta, path)
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: float32 tensors stay views
    sd = {}
    for name, dims, ggml_type, offset in tqdm(infos, desc="dequantizing", unit="tensor", leave=False, disable=None):
        try:
            t = gguf_tensor(data, dims, ggml_type, offset, dtype)
        except Exception as e:  # unknown type, bad shape, truncated data, a block the gguf package refuses
            raise LlamaMinError(f"{path}: tensor '{name}': {one_line(e)}") from None
        if name == "rope_freqs.weight":
            args.rope_freq_divisors = _rope_divisors(t, args, path)
            continue
        try:
            sd[gguf_to_meta_name(name)] = t
        except LlamaMinError as e:
            raise LlamaMinError(f"{path}: {e}") from None
    if "output.weight" not in sd:
        args.tie_word_embeddings = True
    if args.vocab_size <= 0 and "tok_embeddings.weight" in sd:
        args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    return args, sd
