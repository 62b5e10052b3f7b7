"""NLL by position past the trained window (llama_min/inspect/long_context.py, scripts/long_context_viz.py).

Oracles: F.cross_entropy on each window's full logits from model(tokens) (independent of the hook, the
chunking and the log-softmax the module uses); the model's own rope_rows for what each scaling builds.
Tiny random models only; no timing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tiny import TINY, rand_tokens, random_hf_model, tiny_model
from llama_min.checkpoint import build_transformer
from llama_min.errors import LlamaMinError
from llama_min.inspect import long_context as lc

from conftest import python_without_torch

ROOT = Path(__file__).resolve().parent.parent


def rebuild(model, spec: str, trained: int, length: int):
    """The tiny model's weights under another scaling, as `measure` builds them."""
    return build_transformer(lc.scaled_args(model.params, spec, trained, length), model.state_dict()).eval()


def reference_nll(model, windows) -> np.ndarray:
    """Per window: the full logits of one forward, F.cross_entropy against the next token."""
    with torch.no_grad():
        return np.stack([F.cross_entropy(model(w[None])[0, :-1], w[1:], reduction="none").double().numpy()
                         for w in windows])


# ------------------------------------------------------------------------------------------------ the numbers


@pytest.mark.parametrize("spec", ["none", "yarn:4", "dynamic:4"])
def test_nll_by_position_is_cross_entropy_of_each_window(spec):
    model = rebuild(tiny_model(), spec, trained=16, length=64)
    windows = rand_tokens(3, 64, vocab=TINY["vocab_size"])
    ours = lc.nll_by_position(model, windows, chunk=10)  # chunks that do not divide L - 1 = 63
    assert ours.shape == (3, 63) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, reference_nll(model, windows), rtol=1e-5, atol=1e-5)


def test_final_hidden_is_what_the_model_projects():
    model, tokens = tiny_model(), rand_tokens(2, 30)
    with torch.no_grad():
        logits = model(tokens)
        ours = model.output(model.norm(lc.final_hidden(model, tokens)))
    torch.testing.assert_close(ours, logits, rtol=0, atol=1e-6)
    assert not model.layers[-1]._forward_hooks  # the hook is removed


def test_linear_x1_is_none_and_dynamic_is_none_inside_the_window():
    model, tokens = tiny_model(), rand_tokens(2, 40)
    with torch.no_grad():
        none = rebuild(model, "none", 16, 64)(tokens)
        torch.testing.assert_close(rebuild(model, "linear:1", 16, 64)(tokens), none, rtol=0, atol=0)
        inside = tokens[:, :16]  # dynamic scales only forwards that reach past M = 16
        torch.testing.assert_close(rebuild(model, "dynamic:4", 16, 64)(inside), none[:, :16], rtol=0, atol=1e-6)
        assert not torch.allclose(rebuild(model, "dynamic:4", 16, 64)(tokens), none, atol=1e-3)


def test_each_scaling_builds_the_rotation_it_names():
    model = tiny_model()
    rows = {s: rebuild(model, s, 16, 64).rope_rows(0, 64) for s in ("none", "linear:4", "yarn:4", "dynamic:4")}
    torch.testing.assert_close(rows["linear:4"][::4], rows["none"][:16])  # position 4m turns as m did
    assert rows["yarn:4"].abs().mean() > 1.1  # yarn's magnitude a = 0.1 ln 4 + 1
    torch.testing.assert_close(rows["yarn:4"][:, 0] / rows["yarn:4"].abs()[:, 0], rows["none"][:, 0])  # fast pair
    assert not torch.allclose(rows["dynamic:4"], rows["none"])


def test_scaled_args_replace_only_the_scaling_and_the_table():
    base = tiny_model().params
    args = lc.scaled_args(base, "yarn:4", trained_window=16, length=512)
    assert (args.rope_scaling_type, args.rope_scaling_factor, args.rope_original_max_pos) == ("yarn", 4.0, 16)
    assert args.max_seq_len == 512 and (args.dim, args.n_kv_heads, args.rope_theta) == (
        base.dim, base.n_kv_heads, base.rope_theta)
    stored = lc.scaled_args(args, "ckpt", 16, 64)
    assert stored.rope_scaling_type == "yarn" and stored.max_seq_len == 512
    assert lc.scaled_args(args, "none", 16, 64).rope_scaling_type is None
    assert lc.scaling_label("dynamic:4") == "dynamic NTK x4" and lc.scaling_label("ckpt", args) == "as stored (YaRN x4)"
    for bad in ("linear", "linear:0", "cubic:4", "yarn:x"):
        with pytest.raises(LlamaMinError, match="KIND:FACTOR"):
            lc.parse_scaling(bad)


def test_token_windows_from_the_start_or_the_end():
    tokens = list(range(100))
    assert lc.token_windows(tokens, 10, 3).tolist()[1] == list(range(10, 20))
    assert lc.token_windows(tokens, 10, 3, from_end=True).tolist()[-1] == list(range(90, 100))
    with pytest.raises(LlamaMinError, match="fewer than 11 windows"):
        lc.token_windows(tokens, 10, 11)


# ------------------------------------------------------------------------------------------- the saved file


def fake_result(W: int = 8, curves: int = 3) -> dict:
    rng = np.random.default_rng(0)
    return {"labels": ["none", "linear x4", "YaRN x4"][:curves], "trained_window": W,
            "nll": rng.uniform(1, 4, size=(curves, 4 * W - 1)),
            "settings": {"ckpt": "x/ckpt", "text": "t.txt", "windows": 2, "length": 4 * W, "tag": ""}}


def test_saved_file_round_trips_with_its_summary(tmp_path):
    result = fake_result()
    path = lc.save(tmp_path / "lc.npz", result)
    back = lc.load(path)
    assert back["labels"] == result["labels"] and back["trained_window"] == 8
    assert back["settings"] == result["settings"]
    np.testing.assert_allclose(back["nll"], result["nll"], rtol=1e-6)  # stored as float32
    summary = json.loads(path.with_suffix(".json").read_text())
    bands = summary["bands"]["linear x4"]
    assert len(bands) == 4  # [0, W), [W, 2W), [2W, 3W), [3W, 4W - 1)
    assert bands[1] == pytest.approx(math.exp(result["nll"][1, 8:16].mean()), rel=1e-3)
    assert not list(tmp_path.glob("*.tmp"))


def test_load_refuses_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", nll=np.zeros(3))
    with pytest.raises(LlamaMinError, match="missing labels"):
        lc.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(LlamaMinError, match="not a long-context .npz"):
        lc.load(tmp_path / "text.npz")


def test_binned_perplexity():
    centres, ppl = lc.binned(np.log(np.array([1.0, 1, 4, 4, 9])), 2)  # the tail shorter than a bin is dropped
    np.testing.assert_allclose(ppl, [1.0, 4.0])
    np.testing.assert_allclose(centres, [0.5, 2.5])


def test_picture_is_drawn_from_the_saved_files_without_torch(tmp_path):
    """A fresh process where `import torch` fails draws from two saved files (one with a tag)."""
    pytest.importorskip("matplotlib")
    first = lc.save(tmp_path / "a.npz", fake_result())
    tagged = fake_result(curves=1)
    tagged["settings"]["tag"] = "fine-tuned"
    second = lc.save(tmp_path / "b.npz", tagged)
    png = tmp_path / "img" / "lc.png"
    r = python_without_torch("from llama_min.inspect import long_context as lc\n"
                             f"print(lc.draw([{str(first)!r}, {str(second)!r}], {str(png)!r}, width=4))\n", ROOT)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- the command


def test_script_measures_a_checkpoint_then_draws(tmp_path, fixtures_dir):
    """measure on a tiny saved checkpoint (its tokenizer, a text), then draw from the .npz alone."""
    pytest.importorskip("matplotlib")
    ckpt = tmp_path / "ckpt"
    random_hf_model("gqa-5e5", vocab_size=32000).save_pretrained(ckpt)
    shutil.copyfile(fixtures_dir / "mistral-tokenizer.model.v1", ckpt / "tokenizer.model")
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 20)
    out = tmp_path / "lc.npz"
    script = [sys.executable, str(ROOT / "scripts" / "long_context_viz.py")]
    r = subprocess.run(script + ["measure", "--ckpt", str(ckpt), "--text", str(text), "--out", str(out),
                                 "--trained-window", "8", "--windows", "2", "--scalings", "none", "linear:4",
                                 "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = lc.load(out)
    assert data["labels"] == ["none", "linear x4"] and data["nll"].shape == (2, 31)
    assert data["settings"]["length"] == 32 and np.isfinite(data["nll"]).all()
    r = subprocess.run(script + ["draw", str(out), "--out", str(tmp_path / "lc.png")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "lc.png").is_file()
    r = subprocess.run(script + ["measure", "--ckpt", str(ckpt), "--text", str(text), "--out", str(out),
                                 "--scalings", "cubic:2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "KIND:FACTOR" in r.stderr


def test_a_yarn_model_builds_on_the_meta_device():
    """build_transformer builds on the meta device: yarn's ramp must still be computed on the CPU."""
    model = rebuild(tiny_model(), "yarn:4", trained=16, length=64)
    assert model.freqs_cis.device.type == "cpu" and model.freqs_cis.shape == (2 * TINY["max_seq_len"], 8)
