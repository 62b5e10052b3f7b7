"""The memory preflight (llama_min/runtime/memory.py): a window that cannot fit is refused, with the numbers,
before the weights are read, on every path; the estimate bounds measured peaks; Llama.trained_window.

Free memory is monkeypatched where a verdict depends on it, so no test depends on the machine's memory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from _tiny import TINY, tiny_model, write_meta_checkpoint

MiB = 2**20


def run_python(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line, returned as a dict."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


class NoTokenizer:
    """Stands in for a tokenizer where a test builds a checkpoint that has none."""

    n_words, stop_ids = 0, {0}


@pytest.fixture
def no_tokenizer(monkeypatch):
    import llama_min.text.tokenizer as tk

    monkeypatch.setattr(tk, "load_tokenizer", lambda path, **kw: NoTokenizer())


@pytest.fixture
def own_folder(tmp_path):
    from llama_min import save_checkpoint

    m = tiny_model()
    return save_checkpoint(tmp_path / "own", m.params, m.state_dict())


def free_bytes(monkeypatch, n_bytes: int):
    """Make every device report `n_bytes` free."""
    from llama_min.runtime import memory

    monkeypatch.setattr(memory, "free_memory", lambda device: n_bytes)


def no_weights_read(monkeypatch):
    """Fail the test if a path reads weights (the refusal must come first)."""
    import llama_min.generation as gen
    import llama_min.parallel.slicing as slicing
    from llama_min.runtime import packed

    def boom(*a, **k):
        raise AssertionError("weights were read before the memory preflight refused")

    monkeypatch.setattr(gen, "load_checkpoint", boom)
    monkeypatch.setattr(packed, "_tensors", boom)
    for reader in (slicing.SafetensorsFiles, slicing.GGUFSlices, slicing.MetaShards):
        monkeypatch.setattr(reader, "read", boom)


# ------------------------------------------------------------------------------------ (a) the command line


@pytest.mark.parametrize("ctx", [30_000_000, 100_000_000])
def test_cli_refuses_a_huge_window_fast_and_small(require_asset, ctx):
    """The default model (packed Q4_1 GGUF) with -c far beyond memory: exit 2, one `error:` line naming -c,
    no traceback, and the child's peak RSS under 1 GB (measured by a fresh wrapper process)."""
    require_asset("smollm2")
    exe = shutil.which("llama-min")
    assert exe, "the installed command llama-min is not on PATH"
    r = run_python(f"""
        import json, resource, subprocess
        p = subprocess.run([{exe!r}, "generate", "-p", "hi", "-n", "2", "-c", "{ctx}", "--temperature", "0"],
                           capture_output=True, text=True)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(json.dumps(dict(rc=p.returncode, stderr=p.stderr, rss=rss)))
    """)
    errors = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
    assert r["rc"] == 2, r["stderr"]
    assert len(errors) == 1 and "Traceback" not in r["stderr"], r["stderr"]
    assert f"max_seq_len {ctx} (-c)" in errors[0] and "-c/--max-seq-len" in errors[0]
    assert f"RoPE table for {2 * ctx} positions" in errors[0]
    assert r["rss"] < 2**30, f"peak RSS {r['rss'] / MiB:.0f} MiB"


# ------------------------------------------------------------------------ (b) the estimate vs measured peaks


def test_rope_build_estimate_bounds_the_measured_peak():
    """precompute_freqs_cis's peak (a fresh process, VmHWM: unlike ru_maxrss, which a child forked from a
    big pytest process starts with, it is this process's own) is at most rope_build_bytes, and not below
    half of it; the finished table is exactly rope_table_bytes."""
    from llama_min.runtime.memory import rope_build_bytes, rope_table_bytes

    hd, positions = 64, 400_000
    r = run_python(f"""
        import json
        from llama_min.model import ModelArgs, precompute_freqs_cis, rope_frequencies
        freqs = rope_frequencies(ModelArgs(dim={hd} * 4, n_heads=4, n_layers=1, vocab_size=8))
        precompute_freqs_cis(freqs, 1000)  # the ops' one-time setup is not the table's
        rss = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
        base = rss()
        table = precompute_freqs_cis(freqs, {positions})
        print(json.dumps(dict(peak=rss() - base, table=table.numel() * table.element_size())))
    """)
    estimate = rope_build_bytes(hd, positions)
    assert r["table"] == rope_table_bytes(hd, positions)
    assert r["peak"] <= estimate <= 2 * r["peak"], (r["peak"] / MiB, estimate / MiB)


def test_running_estimate_bounds_a_measured_scoring_forward():
    """A KV cache of B x T plus a forward of B x T positions (logits of whole windows, as eval scores them),
    measured in a fresh process: at most window_peak's running part less the table (built before), and not
    below half of it."""
    from llama_min.model import ModelArgs
    from llama_min.runtime.memory import window_peak

    shape = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=16000)
    B, T = 8, 256
    r = run_python(f"""
        import json, torch
        from llama_min.model import ModelArgs, Transformer
        model = Transformer(ModelArgs(max_seq_len={T}, **{shape!r})).eval()
        tokens = torch.randint(0, {shape['vocab_size']}, ({B}, {T}), generator=torch.Generator().manual_seed(0))
        rss = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
        with torch.inference_mode():
            model(tokens[:, :2])  # warm up kernels and the allocator
            base = rss()
            model.setup_cache({B}, {T})
            model(tokens)
        print(json.dumps(dict(peak=rss() - base)))
    """)
    args = ModelArgs(max_seq_len=T, **shape)
    need = window_peak(args, T, B, item=4, scored=T)
    estimate = need.running - need.parts["RoPE table kept"]
    assert r["peak"] <= estimate <= 2 * r["peak"], (r["peak"] / MiB, estimate / MiB)


def test_window_peak_formulas():
    """The parts add up as the docstrings say (SmolLM2's shape, -c 30000000)."""
    from llama_min.model import ModelArgs
    from llama_min.runtime.memory import ALLOCATOR_SLACK, window_peak

    args = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152)
    need = window_peak(args, 30_000_000)
    P = 60_000_000
    assert need.building == 4 * P + 8 * P * 64 + ALLOCATOR_SLACK  # arange + angles + ones + complex64 result
    assert need.parts["RoPE table kept"] == 4 * P * 64
    assert need.parts["KV cache for 1 x 30000000 positions"] == 2 * 30 * 30_000_000 * 3 * 64 * 4
    assert need.peak == need.running > need.building


# ------------------------------------------------------------------------- (c) every path refuses in time


def test_float_path_refuses_before_reading_weights(monkeypatch, own_folder, no_tokenizer):
    from llama_min import Llama
    from llama_min.errors import LlamaMinError

    free_bytes(monkeypatch, 1 * MiB)
    no_weights_read(monkeypatch)
    with pytest.raises(LlamaMinError, match=r"max_seq_len 4096 \(-c\) needs ~.* at its peak \(RoPE table for 8192 "
                                            r"positions.*1\.0 MiB is free on cpu: lower max_seq_len"):
        Llama.build(own_folder, max_seq_len=4096, max_batch_size=1, device="cpu", dtype=torch.float32)


def test_batched_build_counts_the_batch(monkeypatch, own_folder, no_tokenizer):
    """max_batch_size 64: the KV cache for 64 x ctx; free memory between the one-row and the 64-row
    estimate builds one row and refuses 64, naming --batch-size."""
    from llama_min import Llama, ModelArgs
    from llama_min.errors import LlamaMinError
    from llama_min.runtime.memory import window_peak

    args, ctx = ModelArgs(**TINY), 512
    one, many = window_peak(args, ctx, 1).peak, window_peak(args, ctx, 64).peak
    assert many > one
    free_bytes(monkeypatch, (one + many) // 2)
    assert Llama.build(own_folder, max_seq_len=ctx, max_batch_size=1, device="cpu", dtype=torch.float32)
    no_weights_read(monkeypatch)
    with pytest.raises(LlamaMinError, match=r"max_seq_len 512 \(-c\) x max_batch_size 64 .*KV cache for 64 x 512 "
                                            r"positions.*a forward of 64 x 1 positions.*--batch-size"):
        Llama.build(own_folder, max_seq_len=ctx, max_batch_size=64, device="cpu", dtype=torch.float32)


def test_eval_checks_the_logits_of_whole_windows_before_scoring(monkeypatch, require_asset, tmp_path, capsys):
    """Llama.build counts a generation forward (one position per row); `eval` then checks the scoring
    forward (every position's logits, batch x ctx x vocab) before it runs: free memory between the two is
    one error line naming --batch-size."""
    from llama_min.cli.eval import main
    from llama_min.runtime.memory import window_peak
    from llama_min.runtime.packed import gguf_header_args

    path = require_asset("smollm2")
    args = gguf_header_args(path)[0]
    build, scoring = window_peak(args, 64, 8).peak, window_peak(args, 64, 8, scored=64).peak
    assert scoring > build
    (tmp_path / "t.txt").write_text("It was the best of times, it was the worst of times. " * 80)
    free_bytes(monkeypatch, (build + scoring) // 2)
    assert main(["-m", str(path), "--data", str(tmp_path / "t.txt"), "-c", "64", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: max_seq_len 64 (-c) x max_batch_size 8 needs") and "--batch-size" in err[-1]
    assert "a forward of 8 x 64 positions" in err[-1] and len(err) == 2  # the loading line, the error


def test_packed_path_refuses_before_reading_weights(monkeypatch, require_asset):
    from llama_min.errors import LlamaMinError
    from llama_min.runtime.packed import load_gguf_packed

    path = require_asset("smollm2")
    free_bytes(monkeypatch, 64 * MiB)
    no_weights_read(monkeypatch)
    with pytest.raises(LlamaMinError, match=r"max_seq_len 100000 \(-c\) needs .*64\.0 MiB is free"):
        load_gguf_packed(path, "cpu", torch.float32, max_seq_len=100_000)


def test_tensor_parallel_rank_refuses_before_reading_its_slice(monkeypatch, own_folder):
    """A rank counts its share of the KV heads (TINY: 2 heads over 2 ranks -> 1) and refuses before reading."""
    from llama_min import ModelArgs
    from llama_min.errors import LlamaMinError
    from llama_min.parallel.slicing import load_rank_model
    from llama_min.runtime.memory import window_peak

    args, ctx = ModelArgs(**TINY), 262_144  # long enough for the KV cache to decide the peak
    share, whole = window_peak(args, ctx, kv_heads=1).peak, window_peak(args, ctx).peak
    assert share < whole
    free_bytes(monkeypatch, (share + whole) // 2)
    model = load_rank_model(own_folder, 1, 2, "cpu", torch.float32, max_seq_len=ctx)
    assert model.params.max_seq_len == ctx
    free_bytes(monkeypatch, share - 1)
    no_weights_read(monkeypatch)
    with pytest.raises(LlamaMinError, match=r"max_seq_len 262144 \(-c\) needs"):
        load_rank_model(own_folder, 1, 2, "cpu", torch.float32, max_seq_len=ctx)


def test_request_kv_cache_check_is_kept(monkeypatch, own_folder, no_tokenizer):
    """Llama._setup_cache still refuses a request whose KV cache does not fit."""
    from llama_min import Llama
    from llama_min.errors import LlamaMinError

    llama = Llama.build(own_folder, max_seq_len=64, max_batch_size=1, device="cpu", dtype=torch.float32)
    free_bytes(monkeypatch, 1)
    with pytest.raises(LlamaMinError, match="a KV cache of 1 x"):
        llama.generate([[1, 2, 3]], max_gen_len=4, temperature=0)


# ----------------------------------------------------------------------------------- (d) trained_window


def test_trained_window_of_the_default_gguf(require_asset):
    """Llama.trained_window is the file's llama.context_length (read with the gguf package), whatever -c is."""
    import gguf

    from llama_min import Llama

    path = require_asset("smollm2")
    expected = int(gguf.GGUFReader(path).fields["llama.context_length"].contents())
    llama = Llama.build(path, max_seq_len=64, max_batch_size=1, device="cpu")
    assert llama.trained_window == expected and llama.max_seq_len == 64


def test_trained_window_of_a_tiny_hf_folder(tmp_path, no_tokenizer):
    from _tiny import random_hf_model

    from llama_min import Llama

    random_hf_model("gqa-5e5", max_position_embeddings=300).save_pretrained(tmp_path / "hf")
    llama = Llama.build(tmp_path / "hf", max_seq_len=32, max_batch_size=1, device="cpu", dtype=torch.float32)
    assert llama.trained_window == 300


def test_trained_window_of_meta_and_own_files(tmp_path, own_folder):
    """Meta's params.json has none (None); the own format records it, and older own files give their
    max_seq_len."""
    from llama_min import load_checkpoint, save_checkpoint

    m = tiny_model()
    params = {k: v for k, v in TINY.items() if k != "max_seq_len"}
    write_meta_checkpoint(tmp_path / "meta", params, m.state_dict())
    assert load_checkpoint(tmp_path / "meta")[0].trained_window is None
    args = m.params
    args.trained_window = 300
    assert load_checkpoint(save_checkpoint(tmp_path / "own300", args, m.state_dict()))[0].trained_window == 300
    params_json = json.loads((own_folder / "params.json").read_text())
    params_json.pop("trained_window")
    (own_folder / "params.json").write_text(json.dumps(params_json))
    assert load_checkpoint(own_folder)[0].trained_window == TINY["max_seq_len"]
