"""Random-weight GGUF files of real model shapes (scripts/random_gguf.py), and memory when loading them.

Fast: a 1-layer TinyLlama-shaped file in each type holds the tensors, types and tokenizer it should, and
llama_min runs it; the Q4_K_M recipe gives llama.cpp's tensor-type counts at full size. Slow: Llama 3 8B
shaped Q4_0 / Q4_K_M files (~4.5 GB, written once into the asset cache) load and generate within a bound
on peak RSS over the file size, measured in a child process.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parent.parent
VOCAB_ASSETS = {"llama3-8b": "llama3-vocab-gguf", "tinyllama-1.1b": "llama2-vocab-gguf"}


def _script():
    spec = importlib.util.spec_from_file_location("random_gguf", ROOT / "scripts" / "random_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("random_gguf", mod)
    spec.loader.exec_module(mod)
    return mod


rg = _script()


@functools.lru_cache(maxsize=None)
def tokenizer_keys(path: Path) -> dict:
    return {k: (f.types, f.contents()) for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


def expected_types(qtype: str, n: int) -> dict:
    """name -> type, spelled out here from llama.cpp's recipe (not from the script's plan)."""
    more = {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}
    base = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0, "q4_k_m": Q.Q4_K}[qtype]
    out = {"token_embd.weight": base, "output_norm.weight": Q.F32,
           "output.weight": Q.Q6_K if qtype == "q4_k_m" else base}
    for i in range(n):
        for m in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            out[f"blk.{i}.{m}.weight"] = base
        for m in ("attn_v", "ffn_down"):
            out[f"blk.{i}.{m}.weight"] = Q.Q6_K if qtype == "q4_k_m" and i in more else base
        out[f"blk.{i}.attn_norm.weight"] = out[f"blk.{i}.ffn_norm.weight"] = Q.F32
    return out


def test_q4_k_m_recipe_matches_llama_cpp_counts():
    # llama.cpp's own Q4_K_M files: TinyLlama 1.1B "type q4_K: 135, type q6_K: 21", Llama 3 8B "193, 33"
    for shape, q4k, q6k in (("tinyllama-1.1b", 135, 21), ("llama3-8b", 193, 33)):
        n = rg.SHAPES[shape].n_layers
        plan = rg.tensor_plan(shape, "q4_k_m")
        counts = Counter(t for t, _ in plan.values())
        assert (counts[Q.Q4_K], counts[Q.Q6_K], counts[Q.F32]) == (q4k, q6k, 2 * n + 1), shape
        assert {k: t for k, (t, _) in plan.items()} == expected_types("q4_k_m", n)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", "q4_k_m"])
def test_one_layer_tinyllama_file_is_valid_and_runs(tmp_path, qtype, require_asset, capsys):
    from llama_min import Llama

    shape, s = "tinyllama-1.1b", rg.SHAPES["tinyllama-1.1b"]
    vocab = require_asset(VOCAB_ASSETS[shape])
    path = rg.random_gguf(shape, qtype, tmp_path / "m.gguf", n_layers=1)
    assert path == tmp_path / "m.gguf" and "wrote" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left behind

    r = GGUFReader(path)
    kv = s.n_kv_heads * (s.dim // s.n_heads)
    dims = {"token_embd": (s.vocab, s.dim), "output": (s.vocab, s.dim), "attn_q": (s.dim, s.dim),
            "attn_k": (kv, s.dim), "attn_v": (kv, s.dim), "attn_output": (s.dim, s.dim),
            "ffn_gate": (s.ffn, s.dim), "ffn_up": (s.ffn, s.dim), "ffn_down": (s.dim, s.ffn)}
    types = expected_types(qtype, 1)
    assert sorted(t.name for t in r.tensors) == sorted(types)
    for t in r.tensors:
        assert t.tensor_type == types[t.name], t.name
        key = t.name.split(".")[-2]
        # GGUF lists dimensions innermost first
        assert [int(x) for x in t.shape] == ([s.dim] if "norm" in key else list(dims[key][::-1])), t.name
        w = dequantize(np.asarray(t.data)[:4], t.tensor_type)
        if "norm" in key:
            assert np.all(w == 1.0), t.name
        else:
            assert np.isfinite(w).all() and 0.005 < np.abs(w).mean() and np.abs(w).max() <= 0.1, t.name

    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    assert meta["general.architecture"] == "llama" and meta["general.name"].startswith(f"random {shape} ")
    assert meta["general.file_type"] == {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15}[qtype]
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.rope.dimension_count"], meta["llama.context_length"]) == (1, 2048, 5632, 32, 4, 64, 2048)
    assert meta["llama.rope.freq_base"] == 10000.0 and abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    got = {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith("tokenizer.")}
    assert got == tokenizer_keys(vocab) and len(got["tokenizer.ggml.tokens"][1]) == 32000

    llama = Llama.build(path, max_seq_len=64, max_batch_size=1)
    out, _ = llama.generate([[1, 450, 4996]], max_gen_len=2, temperature=0, stop_ids=set())
    assert len(out[0]) == 2 and all(0 <= t < s.vocab for t in out[0])


def test_existing_file_is_reused_and_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch, capsys,
                                                                         require_asset):
    require_asset(VOCAB_ASSETS["tinyllama-1.1b"])
    path = tmp_path / "m.gguf"
    path.write_bytes(b"stand-in")
    assert rg.random_gguf("tinyllama-1.1b", "q4_0", path, n_layers=1) == path
    assert path.read_bytes() == b"stand-in" and "reusing" in capsys.readouterr().out
    path.unlink()

    def fail(self, f):
        raise KeyboardInterrupt

    monkeypatch.setattr(rg._RandomBlocks, "tofile", fail)
    with pytest.raises(KeyboardInterrupt):
        rg.random_gguf("tinyllama-1.1b", "q4_0", path, n_layers=1)
    assert list(tmp_path.iterdir()) == []


def test_default_path_is_in_the_asset_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_MIN_CACHE", str(tmp_path))
    assert rg.default_path("llama3-8b", "q4_k_m") == tmp_path / "random" / "llama3-8b-q4_k_m.gguf"
    assert rg.default_path("tinyllama-1.1b", "q8_0", 1) == tmp_path / "random" / "tinyllama-1.1b-1layers-q8_0.gguf"
    with pytest.raises(ValueError, match="unknown shape"):
        rg.random_gguf("llama-9b", "q4_0")


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from llama_min import Llama, ModelArgs, Transformer
    from llama_min.runtime.memory import kv_cache_bytes

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    with torch.device("meta"):  # one-time cost: torch imports its meta-device kernels (~80 MiB)
        Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32))
    base = status("VmRSS:")
    t0 = time.perf_counter()
    llama = Llama.build(sys.argv[1], max_seq_len=64, max_batch_size=1)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    out, _ = llama.generate([list(range(1000, 1016))], max_gen_len=4, temperature=0, stop_ids=set())
    gen = time.perf_counter() - t0
    p = llama.model.params  # the cache is sized to the request; counted here at the whole max_seq_len
    kv = kv_cache_bytes(p.n_layers, p.kv_heads, p.hd, 1, 64, llama.model.norm.weight.element_size())
    print(json.dumps({"peak": status("VmHWM:"), "base": base, "kv": kv, "load_s": load, "gen_s": gen,
                      "tokens": out[0]}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("qtype, bound", [("q4_0", 1.15), ("q4_k_m", 1.2)])
def test_llama3_8b_shape_loads_within_bound_of_file_size(qtype, bound, require_asset):
    require_asset(VOCAB_ASSETS["llama3-8b"])
    path = rg.random_gguf("llama3-8b", qtype)  # cached: written by the first run only
    size = path.stat().st_size
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    added = r["peak"] - r["base"] - r["kv"]
    print(f"[8b {qtype}] file {size / 2**30:.2f} GiB, load {r['load_s']:.1f} s, 4 tokens {r['gen_s']:.1f} s, "
          f"peak RSS {r['peak'] / 2**30:.2f} GiB, before loading {r['base'] / 2**20:.0f} MiB, "
          f"KV cache {r['kv'] / 2**20:.1f} MiB: loading added {added / size:.2f}x the file (bound {bound}x)")
    assert len(r["tokens"]) == 4
    assert added <= bound * size
