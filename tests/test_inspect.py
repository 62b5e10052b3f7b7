"""`llama-min inspect` (llama_min/inspect/internals.py, pictures.py, cli/inspect.py) against transformers.

transformers is the oracle, on the same weights: its eager attention with output_attentions=True, its
output_hidden_states=True through its own final norm and lm_head (its last hidden state is already normed),
and its q_proj/k_proj outputs, whose RoPE pairs are (i, i + hd/2) where ours are (2i, 2i+1). The tiny models
are random HF checkpoints saved to disk and read back through llama_min's loader, as the command does.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import random_hf_model
from conftest import python_without_torch
from llama_min.cli import main
from llama_min.inspect import internals, pictures

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps"
CONFIGS = ["gqa-5e5", "llama3-f32", "head-dim-32"]  # GQA 4/2, one kv head with llama3 scaling, head_dim 32
PNGS = [name for name, _ in pictures.PICTURES.values()]


@pytest.fixture(scope="module", params=CONFIGS)
def tiny(request, tmp_path_factory, fixtures_dir):
    """(checkpoint folder, HF model with eager attention, our npz arrays) for one tiny random config."""
    hf = random_hf_model(request.param, vocab_size=32000)
    path = tmp_path_factory.mktemp("inspect") / request.param
    hf.save_pretrained(path)
    shutil.copyfile(fixtures_dir / "mistral-tokenizer.model.v1", path / "tokenizer.model")
    hf.set_attn_implementation("eager")
    return path, hf, internals.inspect_prompt(path, PROMPT)


def hf_pass(hf, tokens) -> dict:
    """transformers' attention (L, H, T, T), hidden states, logits and q/k projections (T, heads, hd) per layer."""
    ids = torch.as_tensor(tokens)[None]
    seen = {"q": [], "k": []}
    hooks = []
    for layer in hf.model.layers:
        att = layer.self_attn
        hd = att.head_dim
        hooks.append(att.q_proj.register_forward_hook(lambda m, i, o: seen["q"].append(o[0].view(o.shape[1], -1, hd))))
        hooks.append(att.k_proj.register_forward_hook(lambda m, i, o: seen["k"].append(o[0].view(o.shape[1], -1, hd))))
    try:
        with torch.no_grad():
            out = hf(ids, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    seen.update(attention=torch.cat(out.attentions).numpy(), hidden=[h[0] for h in out.hidden_states],
                logits=out.logits[0])
    return seen


def hf_logit_lens(hf, hidden: list) -> tuple:
    """(top, prob) (L+1, T): lm_head(norm(h_j)), except the last entry, which transformers has already normed."""
    with torch.no_grad():
        logits = [hf.lm_head(hf.model.norm(h)) for h in hidden[:-1]] + [hf.lm_head(hidden[-1])]
    p = torch.softmax(torch.stack(logits).float(), dim=-1)
    return p.argmax(-1).numpy(), p.max(-1).values.numpy(), p


def hf_pair_lengths(x: torch.Tensor) -> np.ndarray:
    """(T, heads, hd) in HF's rotate-half order -> (heads, hd/2): mean over t of |(x[i], x[i + hd/2])|."""
    half = x.shape[-1] // 2
    return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2).mean(0).numpy()


# ------------------------------------------------------------------------------------------------- the numbers


def test_attention_matches_transformers_eager(tiny):
    path, hf, ours = tiny
    ref = hf_pass(hf, ours["tokens"])["attention"]
    assert ours["attention"].shape == ref.shape
    diff = np.abs(ours["attention"] - ref).max()
    print(f"[inspect] max |attention - transformers eager| = {diff:.2e}")
    assert diff < 1e-4


def test_logit_lens_matches_transformers_hidden_states(tiny):
    path, hf, ours = tiny
    ref = hf_pass(hf, ours["tokens"])
    top, prob, _ = hf_logit_lens(hf, ref["hidden"])
    assert ours["logit_lens_top"].shape == (hf.config.num_hidden_layers + 1, len(ours["tokens"]))
    np.testing.assert_array_equal(ours["logit_lens_top"], top)
    np.testing.assert_allclose(ours["logit_lens_prob"], prob, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours["logit_lens_top"][-1], ref["logits"].argmax(-1).numpy())  # the prediction


def test_rope_pair_lengths_match_transformers_projections(tiny):
    path, hf, ours = tiny
    ref = hf_pass(hf, ours["tokens"])
    q = np.stack([hf_pair_lengths(x) for x in ref["q"]])  # (L, H, hd/2)
    k = np.stack([hf_pair_lengths(x) for x in ref["k"]])  # (L, K, hd/2)
    assert ours["rope_pair_q_norm"].shape == q.shape and ours["rope_pair_k_norm"].shape == k.shape
    np.testing.assert_allclose(ours["rope_pair_q_norm"], q, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours["rope_pair_k_norm"], k, atol=1e-5, rtol=1e-5)
    # the pair order matters: Meta's adjacent pairs read in HF's row order give other lengths
    assert not np.allclose(q, np.stack([internals.pair_lengths(x).numpy() for x in ref["q"]]), atol=1e-3)


def test_distance_mass_is_the_mean_along_each_diagonal(tiny):
    path, hf, ours = tiny
    att, mass = ours["attention"], ours["distance_mass"]
    L, H, T, _ = att.shape
    expected = np.zeros((L, H, T))
    for d in range(T):
        expected[..., d] = np.mean([att[..., t, t - d] for t in range(d, T)], axis=0)
    np.testing.assert_allclose(mass, expected, atol=1e-6)
    np.testing.assert_allclose(att.sum(-1), 1, atol=1e-5)  # each row is a distribution...
    assert np.all(np.triu(np.ones((T, T)), 1)[None, None] * att == 0)  # ...over the past only
    # every row's mass, read per distance: sum_d mass[d] * (T - d) = sum of all entries = T
    np.testing.assert_allclose((mass * (T - np.arange(T))).sum(-1), T, rtol=1e-5)


def test_distance_mass_of_known_patterns():
    eye = np.eye(5)[None, None]  # every token attends to itself
    previous = np.eye(5, k=-1)[None, None]
    previous[..., 0, 0] = 1
    assert internals.distance_mass(torch.tensor(eye))[0, 0].tolist() == [1, 0, 0, 0, 0]
    assert internals.distance_mass(torch.tensor(previous))[0, 0].tolist() == [0.2, 1, 0, 0, 0]


def test_npz_holds_the_keys_the_pictures_need(tiny, tmp_path):
    path, hf, ours = tiny
    saved = pictures.load_npz(internals.save_npz(tmp_path / "inspect.npz", ours))
    assert set(pictures.NPZ_KEYS) <= set(saved)
    L, H = hf.config.num_hidden_layers, hf.config.num_attention_heads
    T = len(saved["tokens"])
    assert saved["attention"].shape == (L, H, T, T) and saved["distance_mass"].shape == (L, H, T)
    assert saved["logit_lens_text"].shape == (L + 1, T) and saved["token_text"].shape == (T,)
    assert saved["tokens"][0] == 1  # the Mistral tokenizer's BOS, as generate feeds plain text


def test_refuses_a_transformed_model():
    from llama_min import ModelArgs, Transformer

    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=16, max_seq_len=8)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        internals.inspect_model(model, [1, 2, 3])


# ------------------------------------------------------------------------------------------------ the pictures


def test_every_picture_is_redrawn_from_the_npz_without_torch(tiny, tmp_path):
    """A fresh process where `import torch` fails draws all four pictures from the saved npz."""
    pytest.importorskip("matplotlib")
    path, hf, ours = tiny
    npz = internals.save_npz(tmp_path / "inspect.npz", ours)
    r = python_without_torch("from llama_min.inspect import pictures\n"
                             f"for p in pictures.draw(pictures.load_npz({str(npz)!r}), {str(tmp_path / 'img')!r}): "
                             "print(p)\n", ROOT)
    assert r.returncode == 0, r.stderr
    assert sorted(Path(p).name for p in r.stdout.split()) == sorted(PNGS)
    for name in PNGS:
        assert (tmp_path / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_head_choice_and_summary_read_the_npz():
    T = 6
    att = np.zeros((2, 3, T, T))
    att[0, 0] = np.eye(T, k=-1) + np.eye(T) * (np.arange(T) == 0)[:, None]  # previous token
    att[0, 1, :, 0] = 1  # sink
    att[0, 2] = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]  # uniform over the past
    att[1] = (att[0] + att[0, 2]) / 2  # the same heads, blurred: weaker on every score
    data = dict(attention=att, distance_mass=internals.distance_mass(torch.tensor(att)).numpy())
    scores = pictures.head_scores(data)
    assert scores["previous"][0, 0] == 1 and scores["first"][0, 1] == 1 and np.isclose(scores["spread"][0, 2], 1)
    kinds = {(layer, head): kind for layer, head, kind in pictures.choose_heads(data, per_kind=1)}
    assert kinds[(0, 0)] == "previous" and kinds[(0, 1)] == "first" and kinds[(0, 2)] == "spread"
    assert pictures.slow_share(np.ones((2, 3, 8))) == 0.25


# ------------------------------------------------------------------------------------------------- the command


def run_cli(capsys, *argv) -> tuple:
    code = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.split(), err.strip().splitlines()


def test_command_writes_the_npz_and_the_pictures(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, hf, ours = tiny
    code, out, err = run_cli(capsys, "-m", path, "-p", PROMPT, "--out", tmp_path, "-t", 1, "--heads", "1:3", "0:0")
    assert code == 0, err
    assert out == [str(tmp_path / "inspect.npz")] + [str(tmp_path / name) for name in PNGS]
    saved = pictures.load_npz(tmp_path / "inspect.npz")
    np.testing.assert_array_equal(saved["attention"], ours["attention"])
    assert err[0].startswith(f"loading {path}") and "tokens through 2 layers x 4 heads" in err[1]
    # --redraw: the same pictures from the npz alone, no checkpoint
    code, out, err = run_cli(capsys, "--redraw", tmp_path / "inspect.npz", "--out", tmp_path / "again", "--quiet")
    assert code == 0 and err == [] and out == [str(tmp_path / "again" / name) for name in PNGS]


@pytest.mark.parametrize("argv, words", [
    ([], "-p/--prompt TEXT"),
    (["-p", "hi", "--redraw", "x.npz"], "not both"),
    (["-p", "hi", "--heads", "3"], "--heads 3: expected LAYER:HEAD"),
    (["--redraw", "no-such.npz"], "--redraw no-such.npz: no such file"),
    (["-p", "hi", "-t", "0"], "--threads 0"),
])
def test_command_line_mistakes_are_one_line(capsys, argv, words):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_asked_for_head_must_exist(tiny, tmp_path, capsys):
    path, hf, ours = tiny
    npz = internals.save_npz(tmp_path / "inspect.npz", ours)
    code, out, err = run_cli(capsys, "--redraw", npz, "--out", tmp_path, "--heads", "2:0")
    assert code == 2 and err == ["error: --heads 2:0: this model has layers 0-1 and heads 0-3"]


def test_missing_matplotlib_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, out, err = run_cli(capsys, "-p", "hi", "--out", tmp_path)
    assert code == 1 and err == ["error: the pictures need matplotlib: pip install 'llama_min[viz]'"]


# ----------------------------------------------------------------------------------------- the default model


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_default_model_matches_transformers_gguf_loader(smollm2_path, tmp_path):
    """SmolLM2-135M (Q4_1 GGUF): our dequantized float32 pass against transformers' own GGUF reader."""
    from transformers import LlamaForCausalLM

    ours = internals.inspect_prompt(smollm2_path, "The capital of France is Paris. The capital of Italy is")
    hf = LlamaForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                          dtype=torch.float32, attn_implementation="eager").eval()
    ref = hf_pass(hf, ours["tokens"])
    diff = np.abs(ours["attention"] - ref["attention"]).max()
    print(f"[inspect smollm2] max |attention - transformers eager| = {diff:.2e}")
    assert diff < 1e-4
    top, prob, p = hf_logit_lens(hf, ref["hidden"])
    differ = ours["logit_lens_top"] != top
    # a differing top token is only allowed where transformers' own top two are a near tie
    second = torch.topk(p, 2, dim=-1).values
    near_tie = (second[..., 0] - second[..., 1]).numpy() < 1e-3
    print(f"[inspect smollm2] logit lens: {differ.sum()} of {differ.size} top tokens differ, "
          f"max |dprob| = {np.abs(ours['logit_lens_prob'] - prob).max():.2e}")
    assert not (differ & ~near_tie).any()
    q = np.stack([hf_pair_lengths(x) for x in ref["q"]])
    np.testing.assert_allclose(ours["rope_pair_q_norm"], q, atol=1e-4, rtol=1e-4)
