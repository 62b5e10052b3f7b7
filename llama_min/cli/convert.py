"""Rewrite any checkpoint llama_min loads in llama_min's own format, as a Hugging Face folder or a GGUF file.

SRC is any checkpoint llama-min reads (listed under SRC above: Meta shards are merged, GGUF tensors
dequantized). The tokenizer goes along: its file(s) are copied, or written out when it lives inside a GGUF file.

  --to own  DST/params.json + DST/model.safetensors (Meta names and q/k layout) + tokenizer
  --to hf   DST/config.json + DST/model.safetensors (HF names, HF q/k row order) + tokenizer +
            generation_config.json: transformers' LlamaForCausalLM.from_pretrained(DST) loads it
  --to gguf DST is one .gguf file (--gguf-type f32|f16|bf16|q8_0) with the tokenizer and chat template:
            llama.cpp, Ollama, LM Studio and transformers' GGUF loader read it. Without --gguf-type the
            tensors take --dtype's type (float32 -> f32, bfloat16 -> bf16, float16 -> f16); with neither,
            bf16 for a bfloat16 source and f16 otherwise. From a .gguf source the file's name, licence,
            pre-tokenizer, special-token ids and chat template are kept.

Examples:
  llama-min convert ~/.cache/llama_min/SmolLM2-135M-Instruct.Q4_1.gguf smollm2-own
  llama-min convert runs/tiny/final tiny-hf --to hf
  llama-min convert runs/tiny/final tiny-q8.gguf --to gguf --gguf-type q8_0
  llama-min convert smollm2-hf smollm2-f32.gguf --to gguf --dtype float32
  llama-min convert Llama-2-13b/ llama2-13b-bf16 --dtype bfloat16
"""

from __future__ import annotations

import sys
from typing import Optional

from ..formats import FLOAT_DTYPES, GGUF_TYPES, WRITTEN_FORMATS, format_name, formats_sentence
from .common import Parser, check_utf8, checkpoint_format, checkpoint_size, human_size, run_main


def build_parser(prog: Optional[str] = None) -> Parser:
    written = ", ".join(f"{f} ({format_name(f)})" for f in WRITTEN_FORMATS)
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("src", metavar="SRC", help=f"checkpoint to read: {formats_sentence()}")
    p.add_argument("dst", metavar="DST", help="output directory, or .gguf file with --to gguf (must not exist)")
    p.add_argument("--to", choices=WRITTEN_FORMATS, default="own", help=f"output format: {written} (default own)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None, help="tensor type of a GGUF export (default: "
                   "--dtype's type, else bf16 for a bfloat16 source and f16 otherwise; norms stay f32)")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default=None, help="cast the weights (default: keep as stored; "
                   "GGUF tensors are dequantized to float32)")
    return p


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        args = build_parser(prog).parse_args(argv)
        check_utf8("SRC", args.src)
        check_utf8("DST", args.dst)
        checkpoint_format(args.src, flag="SRC")
        from ..checkpoint import convert  # torch and the formats: only once the command line is good

        out = convert(args.src, args.dst, args.to, args.dtype, args.gguf_type)
        print(f"wrote {out} ({written_what(out, args.to)})", file=sys.stderr)
        return 0

    return run_main(body, argv)


def written_what(out, to: str) -> str:
    """'GGUF, F16 tensors, 270.9 MB' / 'Hugging Face format, 538.1 MB': what convert wrote, read back."""
    size = human_size(checkpoint_size(out))
    if to != "gguf":
        return f"{format_name(to)} format, {size}"
    from ..files.gguf import read_gguf_metadata
    from ..formats.gguf.write import FILE_TYPE

    file_type = read_gguf_metadata(out, prefix="general.file_type").get("general.file_type")
    tensor_type = next((t.upper() for t, n in FILE_TYPE.items() if n == file_type), f"file type {file_type}")
    return f"{format_name(to)}, {tensor_type} tensors, {size}"
