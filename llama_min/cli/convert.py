"""Rewrite any checkpoint llama_min loads in llama_min's own format, as a Hugging Face folder or a GGUF file.

SRC is anything load_checkpoint reads: a Meta dir (params.json + consolidated.*.pth, shards merged), a Hugging
Face dir (config.json + *.safetensors / pytorch_model*.bin), a .gguf file (dequantized) or a llama_min dir.
The tokenizer goes along: its file(s) are copied, or written out when it lives inside a GGUF file.

  --to own  DST/params.json + DST/model.safetensors (Meta names and q/k layout) + tokenizer
  --to hf   DST/config.json + DST/model.safetensors (HF names, HF q/k row order) + tokenizer +
            generation_config.json: transformers' LlamaForCausalLM.from_pretrained(DST) loads it
  --to gguf DST is one .gguf file (--gguf-type f32|f16|bf16|q8_0) with the tokenizer and chat template:
            llama.cpp, Ollama, LM Studio and transformers' GGUF loader read it

Examples:
  llama-min convert ~/.cache/llama_min/SmolLM2-135M-Instruct.Q4_1.gguf smollm2-own
  llama-min convert runs/tiny/final tiny-hf --to hf
  llama-min convert runs/tiny/final tiny-q8.gguf --to gguf --gguf-type q8_0
  llama-min convert Llama-2-13b/ llama2-13b-bf16 --dtype bfloat16
"""

from __future__ import annotations

import sys
from typing import Optional

from ..checkpoint import DTYPES, FORMATS, GGUF_TYPES, convert
from .common import Parser, check_utf8, checkpoint_format, run_main


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("src", metavar="SRC", help="checkpoint to read (Meta dir, HF dir, .gguf file, llama_min dir)")
    p.add_argument("dst", metavar="DST", help="output directory, or .gguf file with --to gguf (must not exist)")
    p.add_argument("--to", choices=FORMATS, default="own", help="output format (default own)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16", help="tensor type of a GGUF export "
                   "(default f16; norms stay f32)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep as stored; "
                   "GGUF tensors are dequantized to float32)")
    return p


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        args = build_parser(prog).parse_args(argv)
        check_utf8("SRC", args.src)
        check_utf8("DST", args.dst)
        checkpoint_format(args.src, flag="SRC")
        out = convert(args.src, args.dst, args.to, args.dtype, args.gguf_type)
        print(f"wrote {out} ({args.to} format)", file=sys.stderr)
        return 0

    return run_main(body, argv)
