"""Tensor parallelism (llama_min/parallel/: layout.py, sharded.py, group.py, slicing.py) on CPU with gloo.

The oracle is the one-process reference: the same tiny random model computed whole (in memory, or loaded
with the ordinary, independent loaders of formats/meta.py, hf.py, gguf.py). N processes must give the same
float32 logits within 1e-5 and the same greedy and seeded-sampled tokens. Runs start real processes with
torchrun (tests/_tp_worker.py is one rank), so they are marked slow; the layout checks run in-process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _tiny import TINY, rand_tokens, tiny_model, write_meta_checkpoint
from _tp_worker import PROMPTS, NoTokenizer
from llama_min import Llama, ModelArgs
from llama_min.errors import LlamaMinError
from llama_min.parallel.layout import Layout, check_split, shard_state_dict

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_tp_worker.py"


# ---------------------------------------------------------------------------------------------
# The layout, in-process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("H,K,N,want", [
    (8, 8, 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),  # MHA: own KV heads
    (8, 4, 2, [[0, 1], [2, 3]]),  # GQA, N divides K
    (8, 2, 4, [[0], [0], [1], [1]]),  # K < N: each KV head on N/K = 2 ranks
    (16, 8, 16, [[h // 2] for h in range(16)]),  # Llama 3 70B shape on 16 ranks
    (4, 1, 4, [[0]] * 4),
])
def test_kv_heads_per_rank(H, K, N, want):
    """Rank r keeps the KV heads its query heads [r*H/N, (r+1)*H/N) read (query head h reads KV head h // (H/K))."""
    args = ModelArgs(dim=H * 8, n_layers=1, n_heads=H, n_kv_heads=K, vocab_size=32, hidden_dim=16 * N)
    got = []
    for r in range(N):
        lay = Layout(args, r, N)
        got.append(list(range(lay.kv_first(), lay.kv_first() + lay.kv_heads)))
        for h in range(r * H // N, (r + 1) * H // N):  # every query head of the rank finds its KV head here
            assert h // (H // K) in got[-1]
    assert got == want


@pytest.mark.parametrize("H,K,N", [(4, 2, 3), (6, 6, 4), (8, 4, 16), (12, 3, 2)])
def test_bad_split_is_one_clear_error(H, K, N):
    args = ModelArgs(dim=H * 8, n_layers=1, n_heads=H, n_kv_heads=K, vocab_size=32, hidden_dim=48)
    with pytest.raises(LlamaMinError, match=f"cannot split over {N} processes"):
        check_split(args, N)


def test_allowed_splits_pass():
    for H, K, N in [(12, 6, 2), (32, 8, 16), (32, 8, 4), (4, 1, 4)]:
        check_split(ModelArgs(dim=H * 8, n_layers=1, n_heads=H, n_kv_heads=K, vocab_size=32, hidden_dim=16 * N), N)


def test_slices_reassemble_the_full_model():
    """Column pieces concatenated by rows and row pieces by columns give back every full matrix."""
    model = tiny_model(n_kv_heads=4, vocab_size=130)  # vocab not a multiple of N: the last rank has fewer rows
    sd, N = model.state_dict(), 4
    parts = [shard_state_dict(sd, Layout(model.params, r, N)) for r in range(N)]
    for name, full in sd.items():
        kind = name.split(".")[-2]
        axis = {"wo": 1, "w2": 1, "tok_embeddings": 1}.get(kind, 0)
        merged = parts[0][name] if full.ndim == 1 else torch.cat([p[name] for p in parts], dim=axis)
        assert torch.equal(merged, full), name


# ---------------------------------------------------------------------------------------------
# Checkpoints of one tiny model in every format, and the one-process oracle
# ---------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path):
    """A word-level tokenizer.json over the tiny vocabulary ("t0" .. "t127")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY["vocab_size"])}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(folder / "tokenizer.json"))


def write_gguf(path: Path, model):
    """A float32 GGUF of the model (q/k rows in Meta's order, as llama.cpp stores them), by llama_min's writer."""
    from llama_min.formats.gguf.write import save_gguf

    save_gguf(path, model.params, model.state_dict(), qtype="f32")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The tiny GQA model (K=2) as Meta (2 shards, embeddings split by columns and by rows), HF and GGUF."""
    from llama_min.checkpoint import save_hf

    base = tmp_path_factory.mktemp("tp")
    model = tiny_model(seed=3)
    params = dict(dim=TINY["dim"], n_layers=TINY["n_layers"], n_heads=TINY["n_heads"], n_kv_heads=TINY["n_kv_heads"],
                  vocab_size=TINY["vocab_size"], hidden_dim=TINY["hidden_dim"], norm_eps=1e-5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    write_meta_checkpoint(base / "meta2", params, sd, n_shards=2, emb_dim=1)
    write_meta_checkpoint(base / "meta2rows", params, sd, n_shards=2, emb_dim=0)
    save_hf(base / "hf", model.params, sd)  # wq/wk rows permuted into HF's order
    write_gguf(base / "tiny.gguf", model)
    write_tokenizer(base)
    return base


def one_process(llama):
    """What the worker computes, in this process, without tensor parallelism: the oracle."""
    with torch.inference_mode():
        logits = llama.model(rand_tokens(2, 12, vocab=llama.model.vocab_size))
    greedy = llama.generate(PROMPTS, max_gen_len=10, temperature=0, logprobs=True)
    sampled = llama.generate(PROMPTS, max_gen_len=10, temperature=1.0, top_p=0.95, seed=7)
    return dict(logits=logits, greedy=greedy, sampled=sampled)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, out: Path, jobs: list, timeout: float = 300, env=None, nnodes: int = 1, node_rank: int = 0,
             port=None, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
           str(WORKER), str(out), *jobs]
    env = dict(os.environ, OMP_NUM_THREADS="1", LLAMA_MIN_TP_TIMEOUT="30", PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def assert_same(got: dict, want: dict):
    assert (got["logits"] - want["logits"]).abs().max().item() < 1e-5
    assert got["greedy"][0] == want["greedy"][0]
    lp_got, lp_want = torch.tensor(got["greedy"][1]), torch.tensor(want["greedy"][1])
    assert torch.allclose(lp_got, lp_want, atol=1e-5)
    assert got["sampled"][0] == want["sampled"][0]


def run_and_compare(tmp_path, n: int, jobs: dict, env=None):
    """Run the jobs on n ranks; compare each with its oracle (a Llama built in this process)."""
    (tmp_path / "tokenizer.json").write_text((jobs.pop("_tok")).read_text())
    rc, _, stderr = torchrun(n, tmp_path, list(jobs), env=env)
    assert rc == 0, stderr[-3000:]
    for i, (job, oracle) in enumerate(jobs.items()):
        got = torch.load(tmp_path / f"job{i}.pt")
        assert_same(got, one_process(oracle()))


def oracle_mem(**over):
    return lambda: Llama(tiny_model(**over), NoTokenizer(), max_seq_len=64, max_batch_size=2)


def oracle_ckpt(path, tok, optimize=False):
    return lambda: Llama.build(path, tok, max_seq_len=64, max_batch_size=2, device="cpu", dtype=torch.float32,
                               optimize=optimize)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, ckpts):
    """N=2: MHA, GQA, K<N (1 KV head); Meta shards used as they are (both embedding layouts), HF, GGUF.

    The checkpoints go through Llama.build with the default speed transforms on (composition)."""
    tok = ckpts / "tokenizer.json"
    jobs = {"_tok": tok, 'mem:{}': oracle_mem(), 'mem:{"n_kv_heads": 4}': oracle_mem(n_kv_heads=4),
            'mem:{"n_kv_heads": 1}': oracle_mem(n_kv_heads=1)}
    for name in ("meta2", "meta2rows", "hf", "tiny.gguf"):
        jobs[f"ckpt:{ckpts / name}"] = oracle_ckpt(ckpts / name, tok, optimize=True)
    run_and_compare(tmp_path, 2, jobs, env={"TP_OPTIMIZE": "1"})


@pytest.mark.slow
def test_four_processes_equal_one(tmp_path, ckpts):
    """N=4: K=2 and K=1 fewer KV heads than ranks; tied embeddings with a vocabulary N does not divide;
    2 Meta shards re-split to 4 (both layouts), HF, GGUF."""
    tok = ckpts / "tokenizer.json"
    tied = dict(tie_word_embeddings=True, vocab_size=130)  # 130 rows: the last rank's logits are padded
    jobs = {"_tok": tok, 'mem:{"n_kv_heads": 1}': oracle_mem(n_kv_heads=1), f"mem:{json.dumps(tied)}": oracle_mem(**tied)}
    for name in ("meta2", "meta2rows", "hf", "tiny.gguf"):
        jobs[f"ckpt:{ckpts / name}"] = oracle_ckpt(ckpts / name, tok)
    run_and_compare(tmp_path, 4, jobs)


@pytest.mark.slow
def test_two_hosts(tmp_path, ckpts):
    """Two torchrun "nodes" on 127.0.0.1 (--nnodes 2 --node_rank 0/1), one process each, from the HF folder."""
    (tmp_path / "tokenizer.json").write_text((ckpts / "tokenizer.json").read_text())
    port, job = free_port(), f"ckpt:{ckpts / 'hf'}"
    nodes = [torchrun(1, tmp_path, [job], nnodes=2, node_rank=r, port=port, wait=False) for r in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    assert_same(torch.load(tmp_path / "job0.pt"), one_process(oracle_ckpt(ckpts / "hf", ckpts / "tokenizer.json")()))


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line from rank 0, every process exits non-zero, nothing hangs
# ---------------------------------------------------------------------------------------------


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.mark.slow
def test_bad_inputs_fail_cleanly(tmp_path, ckpts):
    """3 ranks for 4 heads; a rank whose shard is unreadable; a shard missing (the shapes do not add up)."""
    import shutil

    (tmp_path / "tokenizer.json").write_text((ckpts / "tokenizer.json").read_text())
    broken = tmp_path / "broken"
    shutil.copytree(ckpts / "meta2", broken)
    (broken / "consolidated.01.pth").write_bytes(b"not a pickle")
    missing = tmp_path / "missing"
    shutil.copytree(ckpts / "meta2", missing)
    (missing / "consolidated.01.pth").unlink()
    cases = [(3, ckpts / "hf", "cannot split over 3 processes"),
             (2, broken, "rank 1 of 2: .*consolidated.01.pth: cannot load"),
             (2, missing, "shape .*expected .*found 1 consolidated")]
    import re

    for n, path, pattern in cases:
        start = time.monotonic()
        rc, _, stderr = torchrun(n, tmp_path, [f"ckpt:{path}"], timeout=200)
        assert rc != 0
        lines = error_lines(stderr)
        assert len(lines) == 1 and re.search(pattern, lines[0]), stderr[-3000:]
        assert time.monotonic() - start < 200


@pytest.mark.slow
def test_killed_rank_stops_the_others(tmp_path):
    """Two ranks generating in a loop (plain processes, torchrun's env by hand); kill rank 1: rank 0 exits
    non-zero well within the collectives' timeout instead of waiting forever."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", LLAMA_MIN_TP_TIMEOUT="20", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(ROOT),
               MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "hang"], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        while not all((tmp_path / f"generating{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=60)
        assert procs[0].returncode != 0
        assert time.monotonic() - killed < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


# ---------------------------------------------------------------------------------------------
# Memory: each rank holds about 1/N of the weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_each_hold_about_half(tmp_path):
    """Peak RSS growth (load + one forward) per rank, N=2, below 0.65x of one process's, on an HF folder
    of ~152 MB of float32 weights. The one-process load maps the file and its forward pass touches every
    weight page but the embedding rows of tokens it never sees; torch's one-time set-up is done before
    measuring (tests/_tp_worker.py)."""
    from safetensors.torch import save_file

    from llama_min.formats.common import expected_shapes
    from llama_min.formats.hf import hf_config_from_args

    args = ModelArgs(dim=1024, n_layers=3, n_heads=16, n_kv_heads=4, vocab_size=2048, hidden_dim=2816)
    folder = tmp_path / "hf"
    folder.mkdir()
    tensors, gen = {}, torch.Generator().manual_seed(0)
    for name, shape in expected_shapes(args).items():
        tensors[name] = torch.randn(shape, generator=gen) * 0.02 if len(shape) == 2 else torch.ones(shape)
    from llama_min.formats.hf import to_hf

    _, hf_tensors = to_hf(args, tensors)
    del tensors
    save_file(hf_tensors, folder / "model.safetensors")
    del hf_tensors
    (folder / "config.json").write_text(json.dumps(hf_config_from_args(args)))
    write_tokenizer(tmp_path)
    weights_kib = (folder / "model.safetensors").stat().st_size / 1024

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(WORKER), str(tmp_path), f"rss1:{folder}"], cwd=ROOT, env=env, check=True,
                   timeout=300)
    one = json.loads((tmp_path / "rss0.json").read_text())
    (tmp_path / "rss0.json").unlink()
    rc, _, stderr = torchrun(2, tmp_path, [f"rss:{folder}"])
    assert rc == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rss{r}.json").read_text()) for r in (0, 1)]
    one_load = one["peak"] - one["before"]
    assert one_load > 0.85 * weights_kib  # the bound means something: the model (less the embedding) was resident
    for r in ranks:
        assert r["peak"] - r["before"] < 0.65 * one_load, (ranks, one)


@pytest.mark.slow
def test_generate_script_under_torchrun(ckpts):
    """`torchrun --nproc_per_node 2 scripts/generate.py` prints the one-process completion, once (rank 0)."""
    cmd = ["scripts/generate.py", "--ckpt", str(ckpts / "meta2"), "--tokenizer", str(ckpts / "tokenizer.json"),
           "--prompt", "t5 t17 t99 t3", "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu", "--quiet",
           "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", LLAMA_MIN_TP_TIMEOUT="30", PYTHONPATH=str(ROOT))  # this checkout
    one = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", *cmd],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(one.stdout.split()) == 8 and two.stdout == one.stdout


def test_leave_process_group_closes_the_group(tmp_path):
    """The exit hook of a tensor-parallel run closes the group (a one-rank gloo group here, in-process)."""
    import torch.distributed as dist

    from llama_min.parallel.group import leave_process_group

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()  # a second call (atexit after an explicit one) does nothing


# ---------------------------------------------------------------------------------------------
# Each rank's slice read from the files equals the same slice cut from the model in memory (in-process)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["meta2", "meta2rows", "hf", "tiny.gguf"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_rank_slices_read_from_files(ckpts, name, n):
    """Meta shards as they are (N=2) and re-split (N=1, 4), in both embedding layouts; HF (q/k un-permuted
    per head on the slice); GGUF."""
    from llama_min.parallel.slicing import load_rank_slices

    full = tiny_model(seed=3).state_dict()
    for r in range(n):
        args, layout, sd = load_rank_slices(ckpts / name, r, n)
        want = shard_state_dict(full, layout)
        assert layout.emb_axis == (0 if name == "meta2rows" else 1)
        assert sd.keys() == want.keys()
        for key in want:
            assert torch.allclose(sd[key].float(), want[key], atol=1e-6, rtol=0), key


def test_quantized_gguf_splits_on_whole_blocks(tmp_path):
    """Q8_0 tensors: rows and 32-value blocks of columns are cut before dequantizing; the result equals the
    whole-file loader's dequantized tensors cut afterwards. A split inside a block is one clear error."""
    import gguf
    import numpy as np

    from llama_min.checkpoint import load_checkpoint
    from llama_min.parallel.slicing import load_rank_slices

    model = tiny_model(seed=4, hidden_dim=128)
    path = tmp_path / "q8.gguf"
    write_gguf(path, model)
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("llama."):
            value = field.parts[field.data[0]]
            kind = field.types[0]
            w.add_key_value(field.name, value[0] if len(value) == 1 else value, kind)
    for t in reader.tensors:
        arr = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    args, full = load_checkpoint(tmp_path / "q.gguf")
    for r in range(2):
        _, layout, sd = load_rank_slices(tmp_path / "q.gguf", r, 2)
        for key, want in shard_state_dict(full, layout).items():
            assert torch.equal(sd[key], want), key
    with pytest.raises(LlamaMinError, match="cannot be split at column"):
        load_rank_slices(tmp_path / "q.gguf", 0, 4)  # the embedding's 64 columns in 4: 16, half a block
