#!/usr/bin/env python
"""Convert any checkpoint llama_min loads into llama_min's own format or a Hugging Face folder.

SRC is anything load_checkpoint reads: a Meta dir (params.json + consolidated.*.pth, shards merged), a Hugging
Face dir (config.json + *.safetensors / pytorch_model*.bin), a .gguf file (dequantized) or a llama_min dir.
The tokenizer goes along: its file(s) are copied, or written out when it lives inside a GGUF file.

  --to own  DST/params.json + DST/model.safetensors (Meta names and q/k layout) + tokenizer
  --to hf   DST/config.json + DST/model.safetensors (HF names, HF q/k row order) + tokenizer +
            generation_config.json: transformers' LlamaForCausalLM.from_pretrained(DST) loads it
  --to gguf DST is one .gguf file (--gguf-type f32|f16|bf16|q8_0) with the tokenizer and chat template:
            llama.cpp, Ollama, LM Studio and transformers' GGUF loader read it

Examples:
  python scripts/convert.py ~/.cache/llama_min/SmolLM2-135M-Instruct.Q4_1.gguf smollm2-own
  python scripts/convert.py runs/tiny/final tiny-hf --to hf
  python scripts/convert.py runs/tiny/final tiny-q8.gguf --to gguf --gguf-type q8_0
  python scripts/convert.py Llama-2-13b/ llama2-13b-bf16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = ("float32", "bfloat16", "float16")


def convert(src, dst, to: str = "own", dtype: str | None = None, gguf_type: str = "f16") -> Path:
    """Load `src`, write it to `dst` in format `to` ('own' | 'hf'), cast to `dtype` if given.

    The output is built in a temp dir beside `dst` and renamed into place when complete; an existing
    `dst` is refused (so nothing is overwritten by mistake).
    """
    import torch

    from llama_min.checkpoint import load_checkpoint, save_checkpoint, save_hf
    from llama_min.train import tokenizer_files

    dst = Path(dst)
    if dst.exists():
        raise ValueError(f"{dst}: already exists; choose a new destination")
    if to not in ("own", "hf", "gguf"):
        raise ValueError(f"--to {to!r}: expected own, hf or gguf")
    args, sd = load_checkpoint(src, dtype=getattr(torch, dtype) if dtype else None)
    tok = _tokenizer_or_none(src)
    if to == "gguf":
        from llama_min.formats.gguf_write import save_gguf

        return save_gguf(dst, args, sd, tok, gguf_type)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    try:
        for name, blob in (tokenizer_files(tok, src) if tok is not None else {}).items():
            (tmp / name).write_bytes(blob)
        if to == "own":
            save_checkpoint(tmp, args, sd)
        else:
            save_hf(tmp, args, sd, tokenizer=tok)
        umask = os.umask(0)
        os.umask(umask)
        for f in [*tmp.iterdir(), tmp]:
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _tokenizer_or_none(src):
    """The checkpoint's tokenizer, or None (with a note) when it has none beside it."""
    from llama_min.tokenizer import load_tokenizer

    try:
        return load_tokenizer(src)
    except FileNotFoundError:
        print(f"note: no tokenizer found with {src}; converting the weights only", file=sys.stderr)
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="checkpoint to read (Meta dir, HF dir, .gguf file, llama_min dir)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist)")
    p.add_argument("--to", choices=("own", "hf", "gguf"), default="own", help="output format (default own)")
    p.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                   help="--to gguf: type of the weight matrices (norms stay f32; default f16)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep as stored; "
                   "GGUF tensors are dequantized to float32)")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to, args.dtype, args.gguf_type)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.to} format)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
