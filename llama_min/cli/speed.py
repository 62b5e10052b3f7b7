"""What `llama-min bench` measures and how (the command line is cli/bench.py, whose docstring says what
the rows mean): the machine's memory bandwidth, llama_min and transformers on the same weights, load time
and peak RSS in fresh processes, printed row by row; with --vs-llama-cpp, llama.cpp's programs on the same
GGUF file (cli/llama_cpp.py runs them) and a summary of llama_min against them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import UsageError


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


class CpuShare:
    """Fraction of the machine's CPU time used by *other* processes between start() and stop() (this process's
    own children, llama.cpp's programs under --vs-llama-cpp, count as its own)."""

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    @staticmethod
    def _total_busy():
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def __enter__(self):
        self.busy0, self.total0 = self._total_busy()
        self.own0 = self._own()
        return self

    def __exit__(self, *exc):
        busy1, total1 = self._total_busy()
        tick = os.sysconf("SC_CLK_TCK")
        own = (self._own() - self.own0) * tick
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
            out = subprocess.run([sys.executable, "-m", "llama_min.cli.bench", "--_load_child", which, str(hf_dir)],
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
        if packed_only(opts):  # the packed row reads the file itself: no float copy of the model at all
            from ..runtime.packed import gguf_header_args

            (args, _), sd = gguf_header_args(path), None
        else:
            args, sd = load_checkpoint(path, dtype=torch.float32)
        args.gguf_path, label = path, str(path)
        args.gguf_types = gguf_tensor_types(path)
    args.max_seq_len = max(opts.prefill_len, opts.prompt_len + opts.new_tokens) + 8
    return args, sd, label


def packed_only(opts) -> bool:
    """Whether nothing measured needs the float weights: `--dtypes packed --no-load`, no transformers peer, no
    draft (then an 8B-class GGUF is measured in the memory its packed model takes, not 8B x 4 bytes more)."""
    return opts.dtypes == ["packed"] and opts.no_load and not opts.vs_transformers and opts.draft_quantize is None


def gguf_tensor_types(path) -> str:
    """'Q4_1 x 90, Q8_0 x 1, F32 x 61': the ggml types of a GGUF file's tensors ('' for other files)."""
    from collections import Counter

    from gguf import GGMLQuantizationType

    from ..files.gguf import read_gguf_tensor_infos

    if not Path(path).is_file() or open(path, "rb").read(4) != b"GGUF":
        return ""
    counts = Counter(GGMLQuantizationType(t).name for _, _, t, _ in read_gguf_tensor_infos(path)[1])
    return ", ".join(f"{name} x {n}" for name, n in counts.most_common())


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


def measure_dtype(opts, args, sd, dtype_name: str, prompts: dict, peers=()) -> list:
    """Interleaved rounds of decode / prefill / batch for one dtype; prints the rows and returns them. Each
    decode measurement is preceded by a measurement of the bandwidth (best of 3), since this machine's moves
    from minute to minute: a decode row's share of the bandwidth is taken within each round, like a ratio.
    peers: more implementations measured in the same rounds (llama.cpp's llama-bench), last in each round."""
    impls = [Ours(args, sd, dtype_name)]
    if opts.compile:
        impls.append(Ours(args, sd, dtype_name, compile_=True, compile_mode=opts.compile_mode))
    if opts.draft_quantize and dtype_name == "float32":
        impls.append(Ours(args, sd, dtype_name, draft=opts.draft_quantize, draft_tokens=opts.draft_tokens,
                          compile_=opts.compile, compile_mode=opts.compile_mode))
    if opts.vs_transformers:  # int8 / int4 / packed are compared with transformers in float32
        impls.append(Transformers(args, sd, "float32" if dtype_name in ("int8", "int4", "packed") else dtype_name))
    impls += list(peers)
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
    print("\n" + heading(opts, args, dtype_name, peers))
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


WHAT_RUNS = {"packed": "the GGUF's quantized blocks at their own precision",
             "float32": "float32 weights", "bfloat16": "bfloat16 weights",
             "int8": "llama_min's weight-only int8 (per-channel scales)",
             "int4": "llama_min's weight-only int4 (groups of 32)"}


def heading(opts, args, dtype_name: str, peers=()) -> str:
    """A block's first line: what llama_min runs, and what transformers (and llama.cpp) run beside it when they
    are measured."""
    line = f"{dtype_name}: llama_min on {WHAT_RUNS[dtype_name]}"
    if dtype_name == "packed":
        line += f" ({args.gguf_types})"
    if opts.vs_transformers:
        peer = dtype_name if dtype_name in ("float32", "bfloat16") else "float32"
        line += f"; transformers on the same weights in {peer}"
    if peers:
        line += "; llama.cpp's llama-bench on the same file"
    return line + ":"


def default_dtypes(opts, args) -> list:
    """What `--dtypes` measures when not given: what the checkpoint runs as by default (a quantized GGUF:
    packed), then float32, bfloat16 and int8."""
    from ..runtime.packed import use_packed

    packed = getattr(args, "gguf_path", None) is not None and use_packed(args.gguf_path, None, None, None)
    return ["packed"] * packed + ["float32", "bfloat16", "int8"]


def result_line(what: str, impl, xs: list, base, bws: list) -> str:
    """One printed row: median [min-max] tok/s; for decode, the GB/s of weights read and their share of the
    bandwidth measured just before each round (bws; the median of the per-round shares, with their range);
    the ratio to transformers."""
    line = f"  {what:8s} {impl.name:18s} {fmt(xs, ' tok/s')}"
    if what == "decode" and getattr(impl, "draft", None) is not None:  # an effective rate: no bytes per token
        e = impl.llama.stats.extra
        line += f"  draft accepted {e['acceptance_rate']:.0%}, k={e['draft_tokens']}"
    elif what == "decode" and hasattr(impl, "bytes_per_token"):  # (transformers and llama.cpp: no GB/s)
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
    dtypes = opts.dtypes or default_dtypes(opts, args)
    cpp = setup_llama_cpp(opts, args, dtypes) if opts.vs_llama_cpp else None  # checked before any output
    bw = print_header(opts, args, label)
    if cpp:
        print(cpp["bench"].describe())
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
    for dtype_name in dtypes:
        peers = [cpp["bench"]] if cpp and dtype_name == cpp["dtype"] else []
        results["rows"] += measure_dtype(opts, args, sd, dtype_name, prompts, peers)
    if cpp:
        results["vs_llama_cpp"] = compare_with_llama_cpp(opts, cpp, results["rows"])
    if opts.json:
        from ..files import atomic_write

        atomic_write(opts.json, json.dumps(results, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------------------
# --vs-llama-cpp: llama.cpp's programs on the same GGUF file
# ------------------------------------------------------------------------------------------------


def setup_llama_cpp(opts, args, dtypes: list) -> dict:
    """llama.cpp's llama-bench (and llama-simple beside it), each run once on the file before anything is
    printed, so that a file llama.cpp cannot run is one error line. llama.cpp joins the block of the file's own
    precision: packed for a quantized GGUF, float32 for another."""
    from . import llama_cpp
    from ..runtime.packed import use_packed

    dtype = "packed" if use_packed(args.gguf_path, None, None, None) else "float32"
    if dtype not in dtypes:
        raise UsageError(f"--vs-llama-cpp sets llama.cpp beside llama_min running the file as it is ({dtype}): "
                         f"add {dtype} to --dtypes")
    threads = torch.get_num_threads()
    bench = llama_cpp.LlamaBench(opts.vs_llama_cpp, args.gguf_path, threads)
    bench.probe()
    simple = llama_cpp.simple_beside(opts.vs_llama_cpp)
    start = llama_cpp.start_commands(simple, args.gguf_path, threads) if simple else None
    if start:
        llama_cpp.wall_time(start["llama.cpp"], simple, args.gguf_path)
    return {"bench": bench, "dtype": dtype, "simple": simple, "start": start}


def seconds(xs) -> str:
    med, lo, hi = summary(xs)
    return f"{med:7.3f} s [{lo:.3f}-{hi:.3f}]"


def ratio_text(ratios) -> str:
    med, lo, hi = summary(ratios)
    return f"{med:.2f} [{lo:.2f}-{hi:.2f}]"


def compare_with_llama_cpp(opts, cpp: dict, rows: list) -> dict:
    """The summary: llama_min's prompt and decode tokens/s against llama-bench's from the same rounds, then the
    wall time of a fresh `llama-min generate` against a fresh llama-simple, both -n 32, in interleaved rounds
    (after one untimed run of each). Ratios are llama_min's speed / llama.cpp's, taken within each round."""
    from . import llama_cpp

    bench, threads = cpp["bench"], torch.get_num_threads()
    tok_s = {(r["what"], r["impl"]): r["tok_s"] for r in rows if r["dtype"] == cpp["dtype"]}
    print(f"\nllama_min / llama.cpp, the same file ({cpp['dtype']}), {threads} threads, {opts.rounds} interleaved "
          f"rounds; ratio = llama_min's speed / llama.cpp's, the median of the rounds' ratios [range]:")
    out = {"llama_bench": bench.exe, **bench.info, "dtype": cpp["dtype"], "threads": threads}
    for what, label in (("prefill", f"prompt ({opts.prefill_len} tokens)"),
                        ("decode", f"decode ({opts.new_tokens} after {opts.prompt_len})")):
        ours, theirs = tok_s[(what, "llama_min")], tok_s[(what, "llama.cpp")]
        ratios = [a / b for a, b in zip(ours, theirs)]
        print(f"  {label:27s} llama_min {fmt(ours, ' tok/s'):34s} llama.cpp {fmt(theirs, ' tok/s'):34s} "
              f"ratio {ratio_text(ratios)}")
        out[what] = {"llama_min": ours, "llama.cpp": theirs, "ratios": ratios}
    n = llama_cpp.START_TOKENS
    if cpp["start"] is None:
        print(f"  start + {n} tokens: skipped (no llama-simple beside {bench.exe})")
        return out
    what = {"llama_min": "llama-min generate", "llama.cpp": cpp["simple"]}
    for name, cmd in cpp["start"].items():  # untimed: the same warm file cache and compiled code for both
        llama_cpp.wall_time(cmd, what[name], bench.model)
    times = {name: [] for name in cpp["start"]}
    with CpuShare() as share:
        for _ in range(opts.rounds):
            for name, cmd in cpp["start"].items():
                times[name].append(llama_cpp.wall_time(cmd, what[name], bench.model))
    ratios = [b / a for a, b in zip(times["llama_min"], times["llama.cpp"])]
    print(f"  {f'start + {n} tokens (wall)':27s} llama_min {seconds(times['llama_min']):34s} llama.cpp "
          f"{seconds(times['llama.cpp']):34s} ratio {ratio_text(ratios)}")
    print(f"    (fresh processes: `llama-min generate -n {n} --temperature 0 -t {threads}` against `llama-simple "
          f"-n {n}`, which has no thread flag and runs llama.cpp's default)")
    if share.other > 0.05:
        print(f"  (warning: other processes used {share.other:.0%} of the CPU during this measurement)")
    out["start"] = {"tokens": n, "llama_min_s": times["llama_min"], "llama.cpp_s": times["llama.cpp"],
                    "ratios": ratios}
    return out
