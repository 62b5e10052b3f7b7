"""llama_min.checkpoint / `llama-min convert`: own <-> Hugging Face (transformers loads the output), dtypes, tokenizers, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_min.formats import formats_sentence
import torch

from llama_min import ModelArgs, Transformer, load_checkpoint, save_checkpoint
from llama_min.checkpoint import build_transformer
from llama_min.cli.convert import main
from llama_min.checkpoint import convert

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHAPES = {
    "gqa": dict(n_kv_heads=2),
    "tied": dict(n_kv_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
    "llama3-scaled": dict(n_kv_heads=1, rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0,
                          rope_original_max_pos=32),
}


def random_own_checkpoint(path: Path, seed=0, tokenizer=None, **over) -> Path:
    args = ModelArgs(**dict(dict(dim=64, n_layers=2, n_heads=4, vocab_size=128, hidden_dim=96, max_seq_len=128), **over))
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0, 0.1)
    save_checkpoint(path, args, model.state_dict())
    if tokenizer:
        shutil.copyfile(tokenizer, path / "tokenizer.model")
    return path


def tokens(n=70):
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_to_hf_loads_in_transformers_with_identical_logits(tmp_path, shape):
    from transformers import LlamaForCausalLM

    src = random_own_checkpoint(tmp_path / "own", **SHAPES[shape])
    convert(src, tmp_path / "hf", to="hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    args, sd = load_checkpoint(src)
    with torch.no_grad():
        diff = (hf(tokens()).logits - build_transformer(args, sd).eval()(tokens())).abs().max().item()
    print(f"[convert] {shape}: transformers vs ours max|dlogits| = {diff:.1e}")
    assert diff <= 1e-5


def test_hf_round_trip_is_exact(tmp_path):
    src = random_own_checkpoint(tmp_path / "own", **SHAPES["gqa"])
    convert(src, tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "back", to="own")
    (a_args, a), (b_args, b) = load_checkpoint(src), load_checkpoint(tmp_path / "back")
    assert a_args.kv_heads == b_args.kv_heads and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_and_tokenizer_go_along(tmp_path, fixtures_dir):
    src = random_own_checkpoint(tmp_path / "own", tokenizer=fixtures_dir / "mistral-tokenizer.model.v1",
                                vocab_size=32000)
    convert(src, tmp_path / "bf16", to="own", dtype="bfloat16")
    _, sd = load_checkpoint(tmp_path / "bf16")
    _, ref = load_checkpoint(src)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, ref[k].bfloat16()) for k, t in sd.items())
    assert (tmp_path / "bf16" / "tokenizer.model").read_bytes() == \
        (fixtures_dir / "mistral-tokenizer.model.v1").read_bytes()
    convert(src, tmp_path / "hf16", to="hf", dtype="float16")
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "float16"


def test_cli_errors_are_one_line(tmp_path, capsys):
    src = random_own_checkpoint(tmp_path / "own")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert main([str(src), str(src)]) == 2
    assert main([str(tmp_path / "notes.txt"), str(tmp_path / "x")]) == 2
    assert main([str(src), str(tmp_path / "x"), "--to", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:3] == [f"error: SRC {tmp_path / 'missing'}: no such file or directory",
                       f"error: {src}: already exists; choose a new destination",
                       f"error: SRC {tmp_path / 'notes.txt'}: not a checkpoint: expected {formats_sentence()}"]
    assert len(err) == 4 and err[3].startswith("error: argument --to: invalid choice: 'onnx'")
    assert not (tmp_path / "x").exists()


def test_script_is_the_same_command(tmp_path):
    src = random_own_checkpoint(tmp_path / "own")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), str(src), str(tmp_path / "y"),
                          "--to", "hf"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "y" / "config.json").is_file() and (tmp_path / "y" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.assets
@pytest.mark.slow
def test_gguf_to_own_keeps_weights_and_tokenizer(tmp_path, require_asset):
    from llama_min.text.tokenizer import load_tokenizer

    gguf = require_asset("smollm2")
    convert(gguf, tmp_path / "own")
    (a_args, a), (b_args, b) = load_checkpoint(gguf), load_checkpoint(tmp_path / "own")
    assert a_args == b_args and all(torch.equal(a[k], b[k]) for k in a)
    t1, t2 = load_tokenizer(gguf), load_tokenizer(tmp_path / "own")
    dialog = [{"role": "user", "content": "What is the capital of France? <|im_end|>"}]
    assert t1.encode_dialog(dialog) == t2.encode_dialog(dialog) and t1.stop_ids == t2.stop_ids
