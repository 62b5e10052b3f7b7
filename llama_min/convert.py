"""Convert any checkpoint llama_min loads into llama_min's own format, a Hugging Face folder or a GGUF file.

  convert(src, dst, to="own")  dst/params.json + dst/model.safetensors (Meta names and q/k layout) + tokenizer
  convert(src, dst, to="hf")   dst/config.json + dst/model.safetensors (HF names, HF q/k row order) + tokenizer
                               + generation_config.json: transformers' LlamaForCausalLM.from_pretrained(dst) loads it
  convert(src, dst, to="gguf", gguf_type="f16")   one .gguf file (f32|f16|bf16|q8_0) with the tokenizer and
                               chat template: llama.cpp, Ollama, LM Studio and transformers' GGUF loader read it

`src` is anything load_checkpoint reads: a Meta dir (shards merged), a Hugging Face dir, a .gguf file
(dequantized) or a llama_min dir. The tokenizer goes along: its file(s) are copied, or written out when it
lives inside a GGUF file. The command line is `llama-min convert` (llama_min/cli/convert.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .errors import LlamaMinError
from .files import publish_dir

DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("own", "hf", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def convert(src, dst, to: str = "own", dtype: Optional[str] = None, gguf_type: str = "f16") -> Path:
    """Load `src`, write it to `dst` in format `to` ('own' | 'hf' | 'gguf'), cast to `dtype` if given.

    The output is built under a temp name beside `dst` and renamed into place when complete; an existing
    `dst` is refused (so nothing is overwritten by mistake).
    """
    import torch

    from .checkpoint import load_checkpoint, save_checkpoint, save_hf
    from .train_state import tokenizer_files

    dst = Path(dst)
    if dst.exists():
        raise LlamaMinError(f"{dst}: already exists; choose a new destination")
    if to not in FORMATS:
        raise LlamaMinError(f"--to {to!r}: expected one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise LlamaMinError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if to == "gguf" and gguf_type not in GGUF_TYPES:
        raise LlamaMinError(f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    args, sd = load_checkpoint(src, dtype=getattr(torch, dtype) if dtype else None)
    tok = _tokenizer_or_none(src)
    if to == "gguf":
        from .formats.gguf_write import save_gguf

        return save_gguf(dst, args, sd, tok, gguf_type)

    def build(tmp: Path) -> None:
        for name, blob in (tokenizer_files(tok, src) if tok is not None else {}).items():
            (tmp / name).write_bytes(blob)
        if to == "own":
            save_checkpoint(tmp, args, sd)
        else:
            save_hf(tmp, args, sd, tokenizer=tok)

    return publish_dir(dst, build)


def _tokenizer_or_none(src):
    """The checkpoint's tokenizer, or None (with a note) when it has none beside it."""
    from .tokenizer import load_tokenizer

    try:
        return load_tokenizer(src)
    except FileNotFoundError:
        print(f"note: no tokenizer found with {src}; converting the weights only", file=sys.stderr)
        return None
