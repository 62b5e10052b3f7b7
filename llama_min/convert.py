"""Convert any checkpoint llama_min loads into llama_min's own format or a Hugging Face folder.

  convert(src, dst, to="own")  dst/params.json + dst/model.safetensors (Meta names and q/k layout) + tokenizer
  convert(src, dst, to="hf")   dst/config.json + dst/model.safetensors (HF names, HF q/k row order) + tokenizer:
                               transformers' LlamaForCausalLM.from_pretrained(dst) loads it

`src` is anything load_checkpoint reads: a Meta dir (shards merged), a Hugging Face dir, a .gguf file
(dequantized) or a llama_min dir. The tokenizer goes along: its file(s) are copied, or written out when it
lives inside a GGUF file. The command line is `llama-min convert` (llama_min/cli/convert.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from .errors import LlamaMinError
from .files import publish_dir, read_json

DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("own", "hf")


def convert(src, dst, to: str = "own", dtype: Optional[str] = None) -> Path:
    """Load `src`, write it to `dst` in format `to` ('own' | 'hf'), cast to `dtype` if given; returns `dst`.

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
    args, sd = load_checkpoint(src, dtype=getattr(torch, dtype) if dtype else None)
    tok = _tokenizer_or_none(src)

    def build(tmp: Path) -> None:
        for name, blob in (tokenizer_files(tok, src) if tok is not None else {}).items():
            (tmp / name).write_bytes(blob)
        if to == "own":
            save_checkpoint(tmp, args, sd)
        else:
            save_hf(tmp, args, sd)
            _fix_hf_dtype(tmp / "config.json", sd)

    return publish_dir(dst, build)


def _tokenizer_or_none(src):
    """The checkpoint's tokenizer, or None (with a note) when it has none beside it."""
    from .tokenizer import load_tokenizer

    try:
        return load_tokenizer(src)
    except FileNotFoundError:
        print(f"note: no tokenizer found with {src}; converting the weights only", file=sys.stderr)
        return None


def _fix_hf_dtype(config_path: Path, sd: dict) -> None:
    """Record the weights' real dtype in config.json (save_hf writes float32); the folder is still private."""
    cfg = read_json(config_path, "Hugging Face config")
    cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(cfg, indent=2))
