"""Batch-1 speed of llama_min against transformers (or llama.cpp) on the same weights, and against the memory ceiling.

Decoding one token reads every weight once, so on a CPU decode speed is set by memory bandwidth:
ceiling tok/s = measured GB/s / bytes of weights per token. The script measures that bandwidth in the
same run (the faster of two ways to stream a 256 MB float32 matrix: a one-row F.linear, and a plain
sum of its numbers; on some days the first reaches only 3/4 of the second here): once at the start, and
again just before every decode measurement, whose share of the bandwidth is taken against that one (a
shared machine's bandwidth moves by a third within minutes). Then for each dtype:

  load      load time and peak RSS (fresh processes, ours vs transformers' from_pretrained, same HF folder)
  prefill   tokens/s of a --prefill-len token prompt (generate with one new token)
  decode    tokens/s from the first to the last of --new-tokens tokens after a --prompt-len prompt
  batch     decode tokens/s with --batch prompts at once (all rows together)

Rounds are interleaved (ours, then transformers, in each round) and reported as median [min-max];
ratios are taken within a round. Other processes distort timings on small machines: the report
gives the share of CPU time that other processes used while measuring.

With --vs-llama-cpp PATH (PATH: llama.cpp's llama-bench program), llama-bench measures the same GGUF file in
the same interleaved rounds (prompt and decode tokens/s, same lengths, same -t), in the block of the file's own
precision (packed for a quantized GGUF); and when llama-simple is beside it, a fresh `llama-simple -n 32`
process is timed against a fresh `llama-min generate -n 32` (start + 32 tokens). A summary gives llama_min's
figure, llama.cpp's, and their ratio. To build both programs (~20 minutes on 2 cores; llama-cpp-python's source
package vendors llama.cpp):
  pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
  tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36
  cmake -S vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
  cmake --build build -j2 --target llama-bench llama-simple       # then PATH = build/bin/llama-bench

Examples:
  llama-min bench --vs-transformers                              # default model (SmolLM2-135M, Q4_1)
  llama-min bench --config tinyllama-1.1b --vs-transformers --dtypes float32 int8
  llama-min bench --vs-llama-cpp build/bin/llama-bench -t 2 --dtypes packed --no-load --batch 0
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .common import Parser, UsageError, check_number, checkpoint_format, run_main


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--ckpt", help="checkpoint to measure (default: the default model, SmolLM2-135M-Instruct)")
    src.add_argument("--config", help="model config, a name in configs/ (tiny, tinyllama-1.1b, ...) or a "
                     "params.json-style file: random weights of that shape")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "int8", "int4", "packed"],
                   help="what to measure: packed = a quantized GGUF at its own precision (what `generate` runs "
                   "for one, the default model included); float32 / bfloat16 = the weights dequantized to that "
                   "dtype; int8 / int4 = llama_min's weight-only quantization of them (int4 in groups of 32). "
                   "Default: packed (for a quantized GGUF), float32, bfloat16, int8")
    p.add_argument("--vs-transformers", action="store_true", help="run transformers' LlamaForCausalLM side by side")
    p.add_argument("--vs-llama-cpp", metavar="PATH", help="also measure the same GGUF file with llama.cpp's "
                   "llama-bench program at PATH (and llama-simple beside it), interleaved with llama_min; how "
                   "to build it: below")
    p.add_argument("--compile", action="store_true", help="also measure ours with torch.compile'd decode steps "
                   "(and compile the draft of --draft-quantize)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile (default on a CPU: "
                   "weights frozen into the graph + max-autotune; e.g. 'default' compiles faster)")
    p.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="also measure float32 speculative decoding with this quantized copy as the draft")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (default 3)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before the decode and batch rows "
                   "(default 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per decode measurement (default "
                   "128; the batch row decodes half as many per row)")
    p.add_argument("--prefill-len", type=int, default=512, help="prompt tokens of the prefill row (default 512)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched-decode row (0: skip)")
    p.add_argument("-t", "--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-load", action="store_true", help="skip the load time / peak RSS measurement")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--_load_child", nargs=2, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None, prog: Optional[str] = None):
    opts = build_parser(prog).parse_args(argv)
    for flag, low in (("rounds", 1), ("prompt_len", 1), ("new_tokens", 2), ("prefill_len", 1), ("batch", 0)):
        check_number("--" + flag.replace("_", "-"), getattr(opts, flag), low=low, integer=True)
    check_number("--threads", opts.threads, low=1, integer=True)
    if opts.vs_llama_cpp is not None:
        from .llama_cpp import check_executable

        check_executable(opts.vs_llama_cpp)
        if opts.config:
            raise UsageError("--vs-llama-cpp needs a GGUF file as --ckpt (llama.cpp runs the same file), "
                             "not --config")
    if opts.ckpt is not None:
        fmt = checkpoint_format(opts.ckpt)
        if opts.vs_llama_cpp is not None and fmt != "gguf":
            kind = {"own": "llama_min", "meta": "Meta", "hf": "Hugging Face", "llama2c": "llama2.c"}.get(fmt, fmt)
            raise UsageError(f"--vs-llama-cpp needs a GGUF file (llama.cpp runs the same file): --ckpt "
                             f"{opts.ckpt} is a {kind} checkpoint")
    if opts.dtypes and "packed" in opts.dtypes and opts.config:
        raise UsageError("--dtypes packed measures a quantized GGUF: give it as --ckpt (not --config)")
    return opts


def main(argv=None, prog: Optional[str] = None) -> int:
    def body(argv):
        opts = parse_args(argv, prog)
        from .speed import run  # torch and the model code: only once the flags are good

        return run(opts)

    return run_main(body, argv)


if __name__ == "__main__":  # the fresh processes of the load measurement run this module
    sys.exit(main())
