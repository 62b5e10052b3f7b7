"""Batch-1 speed of llama_min against transformers on the same weights, and against the memory ceiling.

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

Examples:
  llama-min bench --vs-transformers                              # default model (SmolLM2-135M)
  llama-min bench --config tinyllama-1.1b --vs-transformers --dtypes float32 int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .common import Parser, UsageError, check_number, checkpoint_format, run_main


def build_parser(prog: Optional[str] = None) -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--ckpt", help="checkpoint to measure (default: the default model, SmolLM2-135M-Instruct)")
    src.add_argument("--config", help="model config, a name in configs/ (tiny, tinyllama-1.1b, ...) or a "
                     "params.json-style file: random weights of that shape")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"],
                   choices=["float32", "bfloat16", "int8", "int4", "packed"],
                   help="what to measure (int8 / int4 = weight-only int8 / int4 in groups of 32; packed = a "
                   "quantized GGUF --ckpt at its own precision)")
    p.add_argument("--vs-transformers", action="store_true", help="run transformers' LlamaForCausalLM side by side")
    p.add_argument("--compile", action="store_true", help="also measure ours with torch.compile'd decode steps "
                   "(and compile the draft of --draft-quantize)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile (default on a CPU: "
                   "weights frozen into the graph + max-autotune; e.g. 'default' compiles faster)")
    p.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="also measure float32 speculative decoding with this quantized copy as the draft")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (default 3)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
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
    if opts.ckpt is not None:
        checkpoint_format(opts.ckpt)
    if "packed" in opts.dtypes and opts.config:
        raise UsageError("--dtypes packed measures a quantized GGUF: give it as --ckpt (not --config)")
    return opts


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


class CpuShare:
    """Fraction of the machine's CPU time used by *other* processes between start() and stop()."""

    @staticmethod
    def _total_busy():
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def __enter__(self):
        self.busy0, self.total0 = self._total_busy()
        self.own0 = time.process_time()
        return self

    def __exit__(self, *exc):
        busy1, total1 = self._total_busy()
        tick = os.sysconf("SC_CLK_TCK")
        own = (time.process_time() - self.own0) * tick
        self.other = max(0.0, (busy1 - self.busy0) - own) / max(1, total1 - self.total0)


_STREAMED = {}  # the 256 MB matrix machine_bandwidth streams, made once


def machine_bandwidth(rounds=5) -> tuple:
    """GB/s of streaming a 256 MB float32 matrix, best of `rounds`, two ways: through F.linear with one row
    (what a decode step does with PyTorch's kernels) and through a plain sum (a pure read). Returns both."""
    if not _STREAMED:
        _STREAMED["w"], _STREAMED["x"] = torch.randn(8192, 8192), torch.randn(1, 8192)
    w, x = _STREAMED["w"], _STREAMED["x"]
    rates = []
    for stream in (lambda: F.linear(x, w), w.sum):
        stream()
        best = 0.0
        for _ in range(rounds):
            t = time.perf_counter()
            stream()
            best = max(best, w.numel() * 4 / (time.perf_counter() - t) / 1e9)
        rates.append(best)
    return tuple(rates)


def summary(xs):
    return statistics.median(xs), min(xs), max(xs)


def fmt(xs, unit=""):
    med, lo, hi = summary(xs)
    return f"{med:8.1f}{unit} [{lo:.1f}-{hi:.1f}]"


# ------------------------------------------------------------------------------------------------
# The two implementations on the same weights
# ------------------------------------------------------------------------------------------------


class Ours:
    name = "llama_min"

    def __init__(self, args, sd, dtype_name, compile_=False, draft=None, draft_tokens=4, compile_mode=None):
        self.llama = self._build(args, sd, dtype_name)
        self.draft, self.draft_tokens = None, draft_tokens
        if draft:  # speculative decoding, batch 1 only: the decode row; with compile_, the draft's steps compiled
            self.name, self.rows = f"llama_min+draft-{draft}{'(compiled)' * compile_}", ("decode",)
            self.draft = self._build(args, sd, draft)
        elif compile_:
            self.name = "llama_min+compile"
        if compile_:
            compiled = self.draft or self.llama
            compiled.compile(mode=compile_mode)
            print(f"  (compiled the {'draft' if draft else 'decode'} step in {compiled.compile_s:.1f} s)")

    rows = ("decode", "prefill", "batch")

    @staticmethod
    def _build(args, sd, dtype_name):
        from ..checkpoint import build_transformer
        from ..generation import Llama
        from ..runtime.transforms import apply_transforms

        if dtype_name == "packed":  # a quantized GGUF at its own precision, as Llama.build loads it
            from ..runtime.packed import load_gguf_packed

            model = load_gguf_packed(args.gguf_path, "cpu", torch.float32, args.max_seq_len)
            apply_transforms(model.eval().requires_grad_(False))
            return Llama(model, _NoTokenizer(), max_seq_len=args.max_seq_len, max_batch_size=64)
        dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
        model = build_transformer(args, sd, dtype=dtype).eval().requires_grad_(False)
        apply_transforms(model, quantize=dtype_name if dtype_name in ("int8", "int4") else None)  # as Llama.build
        return Llama(model, _NoTokenizer(), max_seq_len=args.max_seq_len, max_batch_size=64)

    def bytes_per_token(self):
        return self.llama.weight_bytes_per_token()

    def decode(self, prompts, new_tokens):
        self.llama.generate(prompts, max_gen_len=new_tokens, temperature=0, stop_ids=set(), draft=self.draft,
                            draft_tokens=self.draft_tokens)
        s = self.llama.stats
        return len(prompts) * (new_tokens - 1) / s.decode_s

    def prefill(self, prompt):
        start = time.perf_counter()
        self.llama.generate([prompt], max_gen_len=1, temperature=0, stop_ids=set())
        return len(prompt) / (time.perf_counter() - start)


class Transformers:
    name = "transformers"

    def __init__(self, args, sd, dtype_name):
        from transformers import LlamaConfig, LlamaForCausalLM

        from ..checkpoint import to_hf

        cfg, hf_sd = to_hf(args, sd)
        dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
        model = LlamaForCausalLM(LlamaConfig(**cfg))  # on the CPU: its rotary buffers need real init
        model.load_state_dict(hf_sd, strict=False)
        model.tie_weights()
        self.model = model.to(dtype).eval()
        self.model.generation_config.pad_token_id = 0

    def _generate(self, prompts, n):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)
            return time.perf_counter() - start

    def decode(self, prompts, new_tokens):
        # (time for n tokens) - (time for 1 token) = the n-1 decode steps, prefill excluded
        return len(prompts) * (new_tokens - 1) / (self._generate(prompts, new_tokens) - self._generate(prompts, 1))

    def prefill(self, prompt):
        return len(prompt) / self._generate([prompt], 1)


def _runs(impl, what: str) -> bool:
    """Whether an implementation takes part in a row ("batch8" is a "batch" row); all of them unless it says."""
    rows = getattr(impl, "rows", None)
    return rows is None or what.rstrip("0123456789") in rows


class _NoTokenizer:
    """Generation here runs on token ids only."""

    stop_ids: set = set()
    n_words = 0


# ------------------------------------------------------------------------------------------------
# Load time and peak RSS, each in a fresh process
# ------------------------------------------------------------------------------------------------


def _vm_kib(field: str) -> int:
    """VmRSS / VmHWM (peak RSS) of this process in KiB; ru_maxrss may carry the parent's peak over exec."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def load_child(which: str, path: str):
    base = _vm_kib("VmRSS")
    start = time.perf_counter()
    if which == "ours":
        from .. import load_checkpoint
        from ..checkpoint import build_transformer

        args, sd = load_checkpoint(path)
        model = build_transformer(args, sd)
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    elapsed = time.perf_counter() - start
    with torch.inference_mode():  # touch every weight once, as the first real use does
        model(torch.tensor([[1, 2]]))
    peak = _vm_kib("VmHWM")
    print(json.dumps({"seconds": elapsed, "rss_mib": (peak - base) / 1024}))


def measure_load(hf_dir: Path, weights_bytes: int, rounds: int):
    rows = {}
    for which in ("ours", "transformers"):
        runs = []
        for _ in range(rounds):
            out = subprocess.run([sys.executable, "-m", __name__, "--_load_child", which, str(hf_dir)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[which] = runs
    print(f"\nload (HF folder, float32, {weights_bytes / 2**20:.0f} MiB of weights; RSS after a first forward), "
          f"{rounds} fresh processes each:")
    for which, runs in rows.items():
        secs = [r["seconds"] for r in runs]
        rss = [r["rss_mib"] for r in runs]
        print(f"  {which:13s} {fmt(secs, ' s')}   peak RSS added {fmt(rss, ' MiB')}"
              f"  = {statistics.median(rss) * 2**20 / weights_bytes:.2f}x the weights")
    return rows


# ------------------------------------------------------------------------------------------------


def load_weights(opts):
    """(ModelArgs, float32 state dict, label): a checkpoint, or random weights of a config's shape."""
    from ..checkpoint import load_checkpoint
    from ..files import read_json
    from ..model import ModelArgs, Transformer
    from ..train.config import resolve_model_config

    if opts.config:
        path = resolve_model_config(opts.config)
        args = ModelArgs.from_dict(read_json(path, "model config"))
        torch.manual_seed(0)
        model = Transformer(args)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.02)
        sd = model.state_dict()
        label = f"{path} (random weights)"
    else:
        path = opts.ckpt
        if path is None:
            from ..assets import default_model_path

            path = default_model_path()
        args, sd = load_checkpoint(path, dtype=torch.float32)
        args.gguf_path, label = path, str(path)  # (the packed row reads the file itself)
    args.max_seq_len = max(opts.prefill_len, opts.prompt_len + opts.new_tokens) + 8
    return args, sd, label


def print_header(opts, args, label) -> float:
    """Model, machine and measured memory bandwidth (GB/s, returned)."""
    versions = f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    if opts.vs_transformers:
        import transformers

        versions += f", transformers {transformers.__version__}"
    print(f"model: {label}: dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.kv_heads} heads, "
          f"vocab {args.vocab_size}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {versions}")
    linear, read = machine_bandwidth()
    bw = max(linear, read)
    print(f"memory bandwidth: {bw:.1f} GB/s (a 256 MB float32 matrix, best of 5: {linear:.1f} GB/s through a "
          f"one-row F.linear, {read:.1f} GB/s summed)")
    return bw


def measure_dtype(opts, args, sd, dtype_name: str, prompts: dict) -> list:
    """Interleaved rounds of decode / prefill / batch for one dtype; prints the rows and returns them. Each
    decode measurement is preceded by a measurement of the bandwidth (best of 3), since this machine's moves
    from minute to minute: a decode row's share of the bandwidth is taken within each round, like a ratio."""
    impls = [Ours(args, sd, dtype_name)]
    if opts.compile:
        impls.append(Ours(args, sd, dtype_name, compile_=True, compile_mode=opts.compile_mode))
    if opts.draft_quantize and dtype_name == "float32":
        impls.append(Ours(args, sd, dtype_name, draft=opts.draft_quantize, draft_tokens=opts.draft_tokens,
                          compile_=opts.compile, compile_mode=opts.compile_mode))
    if opts.vs_transformers:  # int8 / int4 / packed are compared with transformers in float32
        impls.append(Transformers(args, sd, "float32" if dtype_name in ("int8", "int4", "packed") else dtype_name))
    for impl in impls:  # warm up (a compiled step compiles once more for a batch of several rows)
        impl.decode([prompts["short"]], 8)
        if _runs(impl, "prefill"):
            impl.prefill(prompts["long"][:64])
        if opts.batch and _runs(impl, "batch"):
            impl.decode(prompts["batch"], 4)
    measure = {"decode": lambda i: i.decode([prompts["short"]], opts.new_tokens),
               "prefill": lambda i: i.prefill(prompts["long"])}
    if opts.batch:
        measure[f"batch{opts.batch}"] = lambda i: i.decode(prompts["batch"], opts.new_tokens // 2)
    print(f"\n{dtype_name} (transformers in {dtype_name if dtype_name in ('float32', 'bfloat16') else 'float32'}):")
    rows = []
    for what, fn in measure.items():
        here = [i for i in impls if _runs(i, what)]
        per = {i.name: [] for i in here}
        beside = {i.name: [] for i in here}  # decode: the bandwidth measured just before each measurement
        with CpuShare() as share:
            for _ in range(opts.rounds):
                for impl in here:
                    if what == "decode":
                        beside[impl.name].append(max(machine_bandwidth(rounds=3)))
                    per[impl.name].append(fn(impl))
        for impl in here:
            print(result_line(what, impl, per[impl.name], per.get("transformers"), beside[impl.name]))
            rows.append({"dtype": dtype_name, "what": what, "impl": impl.name, "tok_s": per[impl.name]})
            if beside[impl.name]:
                rows[-1]["bandwidth_gbs"] = beside[impl.name]
        if share.other > 0.05:
            print(f"  (warning: other processes used {share.other:.0%} of the CPU during this measurement)")
    return rows


def result_line(what: str, impl, xs: list, base, bws: list) -> str:
    """One printed row: median [min-max] tok/s; for decode, the GB/s of weights read and their share of the
    bandwidth measured just before each round (bws; the median of the per-round shares, with their range);
    the ratio to transformers."""
    line = f"  {what:8s} {impl.name:18s} {fmt(xs, ' tok/s')}"
    if what == "decode" and getattr(impl, "draft", None) is not None:  # an effective rate: no bytes per token
        e = impl.llama.stats.extra
        line += f"  draft accepted {e['acceptance_rate']:.0%}, k={e['draft_tokens']}"
    elif what == "decode" and impl.name != "transformers":
        gbs = statistics.median(xs) * impl.bytes_per_token() / 1e9
        shares = [x * impl.bytes_per_token() / 1e9 / bw for x, bw in zip(xs, bws)]
        line += (f"  {gbs:5.1f} GB/s = {statistics.median(shares):4.0%} of the bandwidth measured beside it "
                 f"[{min(shares):.0%}-{max(shares):.0%} of {min(bws):.1f}-{max(bws):.1f} GB/s]")
    if base and impl.name != "transformers":
        ratios = [a / b for a, b in zip(xs, base)]
        line += f"  x{statistics.median(ratios):.2f} vs transformers [{min(ratios):.2f}-{max(ratios):.2f}]"
    return line


def run(opts) -> int:
    if opts._load_child:
        load_child(*opts._load_child)
        return 0
    if opts.threads:
        torch.set_num_threads(opts.threads)
    args, sd, label = load_weights(opts)
    bw = print_header(opts, args, label)
    results = {"model": label, "threads": torch.get_num_threads(), "bandwidth_gbs": bw, "rows": []}
    if not opts.no_load:
        from ..checkpoint import save_hf

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(tmp, args, sd)
            weights = sum(t.numel() * 4 for k, t in sd.items()
                          if not (k == "output.weight" and args.tie_word_embeddings))
            results["load"] = measure_load(Path(tmp), weights, opts.rounds)
    g = torch.Generator().manual_seed(0)
    prompts = {"short": torch.randint(3, args.vocab_size, (opts.prompt_len,), generator=g).tolist(),
               "long": torch.randint(3, args.vocab_size, (opts.prefill_len,), generator=g).tolist()}
    prompts["batch"] = [torch.randint(3, args.vocab_size, (opts.prompt_len,), generator=g).tolist()
                        for _ in range(opts.batch)]
    for dtype_name in opts.dtypes:
        results["rows"] += measure_dtype(opts, args, sd, dtype_name, prompts)
    if opts.json:
        from ..files import atomic_write

        atomic_write(opts.json, json.dumps(results, indent=2, default=str))
    return 0


def main(argv=None, prog: Optional[str] = None) -> int:
    return run_main(lambda argv: run(parse_args(argv, prog)), argv)


if __name__ == "__main__":  # the fresh processes of the load measurement run this module
    sys.exit(main())
