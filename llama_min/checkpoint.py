"""Load and save checkpoints: Meta, Hugging Face, GGUF and our own format, into one internal form.

Internal form = Meta's: `ModelArgs` + a state dict with Meta's key names (`layers.N.attention.wq.weight`,
...) and Meta's q/k row order (RoPE pairs are adjacent rows 2i, 2i+1 of each head).

  Meta    params.json + consolidated.NN.pth (model-parallel shards merged here, on the CPU)
  HF      config.json + model*.safetensors (or pytorch_model*.bin); q/k rows un-permuted per head
  GGUF    one .gguf file; quantized tensors dequantized with the `gguf` package; q/k already Meta order
  own     params.json (ModelArgs) + model.safetensors with Meta names, written by `save_checkpoint`
  llama2c karpathy/llama2.c's train.py `.pt` or export.py `.bin` (versions 0, 1, 2)

A Hugging Face hub id or HF cache folder is first resolved to a local folder (llama_min.files.hub).

Each format lives in llama_min/formats/; this module detects which one a path holds and dispatches.

Converting (llama-min convert):

  convert(src, dst, to="own")  dst/params.json + dst/model.safetensors (Meta names and q/k layout) + tokenizer
  convert(src, dst, to="hf")   dst/config.json + dst/model.safetensors (HF names, HF q/k row order) + tokenizer
                               + generation_config.json: transformers' LlamaForCausalLM.from_pretrained(dst) loads it
  convert(src, dst, to="gguf", gguf_type=None)   one .gguf file (f32|f16|bf16|q8_0) with the tokenizer and
                               chat template: llama.cpp, Ollama, LM Studio and transformers' GGUF loader read it.
                               The tensor type: `gguf_type`, else the one `dtype` names (float32 -> f32), else
                               bf16 for a bfloat16 source and f16 for any other (llama.cpp's converter's rule:
                               the 16-bit float that loses least). A GGUF source's own metadata (name,
                               pre-tokenizer, special ids, chat template, ...) is kept as the file said it.

`src` is anything load_checkpoint reads: a Meta dir (shards merged), a Hugging Face dir, a .gguf file
(dequantized) or a llama_min dir. The tokenizer goes along: its file(s) are copied, or written out when it
lives inside a GGUF file. The command line is `llama-min convert` (llama_min/cli/convert.py).

Weights are memory-mapped where the format allows and converted one tensor at a time, so a load
never holds two full copies of the model.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from .errors import LlamaMinError
from .files import publish_dir
from .formats import FLOAT_DTYPES, GGUF_TYPES, WRITTEN_FORMATS, format_name
from .formats.common import check_state_dict, expected_shapes, hf_to_meta_qk, meta_to_hf_qk  # noqa: F401
from .formats.gguf.read import load_gguf
from .formats.hf import load_hf, save_hf, to_hf  # noqa: F401
from .formats.llama2c import is_llama2c, load_llama2c
from .formats.meta import load_meta
from .formats.own import load_own, save_checkpoint  # noqa: F401
from .files.hub import resolve_checkpoint
from .model import ModelArgs, Transformer


RANDOM_FILLS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")  # torch.nn.init's and Tensor's


class _NoRandomFill(TorchFunctionMode):
    """Inside it, filling a meta tensor with random numbers (torch.nn.init.normal_, Tensor.uniform_, ...) does
    nothing: the tensor is returned as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
        if getattr(func, "__name__", "") in RANDOM_FILLS and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


@contextmanager
def shapes_only():
    """Build modules on the meta device: shapes and dtypes, no memory, and no random init.

    The modules' constructors fill their weights with random numbers, which a checkpoint's tensors replace at
    once; on the meta device that fill only costs time, and torch's first meta normal_ imports some 800 modules
    (~1 s of start-up, measured). So the fills are skipped here (a TorchFunctionMode, only inside this block)."""
    with torch.device("meta"), _NoRandomFill():
        yield


def build_transformer(args: ModelArgs, state_dict: dict, device=None, dtype=None) -> Transformer:
    """A Transformer holding these tensors, built with shapes_only() so no random init is allocated.

    A sliding-window model (Mistral) is exactly Llama while every query sees its whole past, that is while
    args.max_seq_len <= args.sliding_window; a longer window would need the window mask, so it is refused.
    """
    check_window(args)
    with shapes_only():
        model = Transformer(args)
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.tie_weights()
    return model.to(device=device, dtype=dtype)


def check_window(args: ModelArgs) -> None:
    """Refuse a context longer than a Mistral-style sliding window (keys older than it would be masked)."""
    if args.sliding_window is not None and args.max_seq_len > args.sliding_window:
        raise LlamaMinError(
            f"max_seq_len {args.max_seq_len} is longer than the model's sliding_window {args.sliding_window}: "
            "llama_min computes sliding-window models only within the window; use max_seq_len <= "
            f"{args.sliding_window}")


def detect_format(path) -> str:
    """'gguf' | 'llama2c' | 'own' | 'meta' | 'hf' for a checkpoint path, or a ValueError saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if _is_gguf(path):
            return "gguf"
        if is_llama2c(path):
            return "llama2c"
        raise LlamaMinError(f"{path}: not a GGUF file or llama2.c .pt/.bin; expected one of those or a "
                            "checkpoint directory")
    if (path / "params.json").is_file() and (path / "model.safetensors").is_file():
        return "own"
    if (path / "params.json").is_file() and sorted(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    raise LlamaMinError(
        f"{path}: not a known checkpoint; expected params.json + consolidated.*.pth (Meta), "
        "config.json + *.safetensors (Hugging Face), params.json + model.safetensors (llama_min) or a .gguf file"
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_checkpoint(path, dtype: Optional[torch.dtype] = None):
    """Load any supported checkpoint -> (ModelArgs, state dict with Meta names and Meta q/k layout).

    Tensors come as stored (GGUF: dequantized to float32) unless `dtype` is given. Tied embeddings
    appear as one tensor under both `tok_embeddings.weight` and `output.weight`.
    """
    path = resolve_checkpoint(path)  # hub ids and HF cache folders -> a local folder (llama_min.files.hub)
    fmt = detect_format(path)
    loader = {"gguf": load_gguf, "llama2c": load_llama2c, "own": load_own, "meta": load_meta, "hf": load_hf}[fmt]
    args, sd = loader(path, dtype)
    if "output.weight" not in sd and args.tie_word_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(args, sd, path)
    return args, sd


# ------------------------------------------------------------------------------------------ converting

DTYPES, FORMATS = FLOAT_DTYPES, WRITTEN_FORMATS  # what convert casts to and writes (formats/__init__.py)
GGUF_TYPE_OF_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def convert(src, dst, to: str = "own", dtype: Optional[str] = None, gguf_type: Optional[str] = None) -> Path:
    """Load `src`, write it to `dst` in format `to` ('own' | 'hf' | 'gguf'), cast to `dtype` if given.

    `gguf_type` (f32 | f16 | bf16 | q8_0): the GGUF tensor type; None: `export_gguf_type`'s choice.
    The output is built under a temp name beside `dst` and renamed into place when complete; an existing
    `dst` is refused (so nothing is overwritten by mistake).
    """
    from .text.tokenizer import tokenizer_files

    dst = Path(dst)
    if dst.exists():
        raise LlamaMinError(f"{dst}: already exists; choose a new destination")
    if to not in FORMATS:
        raise LlamaMinError(f"--to {to!r}: expected one of "
                            f"{', '.join(f'{f} ({format_name(f)})' for f in FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise LlamaMinError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if to == "gguf" and gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise LlamaMinError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    args, sd = load_checkpoint(src, dtype=getattr(torch, dtype) if dtype else None)
    tok = _tokenizer_or_none(src)
    if to == "gguf":
        return _convert_to_gguf(src, dst, args, sd, tok, gguf_type or export_gguf_type(sd, dtype))

    def build(tmp: Path) -> None:
        for name, blob in (tokenizer_files(tok, src) if tok is not None else {}).items():
            (tmp / name).write_bytes(blob)
        if to == "own":
            save_checkpoint(tmp, args, sd)
        else:
            save_hf(tmp, args, sd, tokenizer=tok)

    return publish_dir(dst, build)


def export_gguf_type(sd: dict, dtype: Optional[str] = None) -> str:
    """The GGUF tensor type when none is asked: the one `dtype` names, else llama.cpp's converter's default
    (bf16 when the source's matrices are bfloat16, f16 otherwise, float32 and dequantized GGUF included)."""
    if dtype is not None:
        return GGUF_TYPE_OF_DTYPE[dtype]
    first_matrix = next((t for t in sd.values() if t.ndim == 2), None)
    return "bf16" if first_matrix is not None and first_matrix.dtype == torch.bfloat16 else "f16"


def _convert_to_gguf(src, dst: Path, args: ModelArgs, sd: dict, tok, gguf_type: str) -> Path:
    """Write the GGUF export; a GGUF source's metadata goes along (save_gguf keeps what it said)."""
    from .files.gguf import read_gguf_metadata
    from .formats.gguf.write import save_gguf

    path = resolve_checkpoint(src)
    keep = read_gguf_metadata(path) if detect_format(path) == "gguf" else None
    name = Path(path).stem if Path(path).is_file() else Path(path).resolve().name
    return save_gguf(dst, args, sd, tok, gguf_type, name=name, keep=keep)


def _tokenizer_or_none(src):
    """The checkpoint's tokenizer, or None (with a note) when it has none beside it."""
    from .text.tokenizer import load_tokenizer

    try:
        return load_tokenizer(src)
    except FileNotFoundError:
        print(f"note: no tokenizer found with {src}; converting the weights only", file=sys.stderr)
        return None
