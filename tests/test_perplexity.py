"""The eval tool: llama.cpp's windows, scored half, BOS rule; checked against a plain forward + F.cross_entropy."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llama_min import ModelArgs, Transformer
from llama_min.errors import LlamaMinError
from llama_min.cli.eval import main
from llama_min.decoding.perplexity import perplexity, windows


def tiny_model():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96,
                                  max_seq_len=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)  # sharper than the default init: a perplexity far from the vocab size
    return model


def independent_nll(model, tokens, n_ctx, bos):
    """Every window by hand: BOS first, a full forward, then F.cross_entropy on positions n_ctx/2 .. n_ctx-2."""
    nll = []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        w = [bos] + tokens[start + 1 : start + n_ctx]
        with torch.no_grad():
            logits = model(torch.tensor([w]))[0]
        for p in range(n_ctx // 2, n_ctx - 1):
            nll.append(F.cross_entropy(logits[p : p + 1], torch.tensor([w[p + 1]])).item())
    return nll


@pytest.mark.parametrize("n_ctx,batch_size", [(16, 1), (17, 2), (32, 3)])
def test_perplexity_is_exp_mean_nll_of_llama_cpp_windows(n_ctx, batch_size):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 97, (5 * n_ctx + n_ctx // 3,), generator=g).tolist()  # a partial tail window
    r = perplexity(model, tokens, n_ctx, bos_id=0, batch_size=batch_size, progress=False)
    nll = independent_nll(model, tokens, n_ctx, bos=0)
    assert r["windows"] == 5 and r["scored_tokens"] == len(nll) == 5 * (n_ctx - 1 - n_ctx // 2)
    assert r["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert r["perplexity"] > 1


def test_windows_replace_the_first_token_by_bos_only_when_asked():
    toks = list(range(10, 30))
    assert windows(toks, 8, bos_id=1) == [[1] + toks[1:8], [1] + toks[9:16]]
    assert windows(toks, 8, bos_id=None) == [toks[0:8], toks[8:16]]
    with pytest.raises(LlamaMinError, match="fewer than one window"):
        windows(toks, 32, None)


def test_max_windows_scores_a_prefix():
    model, tokens = tiny_model(), list(range(1, 97)) * 2
    a = perplexity(model, tokens, 16, 0, max_windows=2, progress=False)
    nll = independent_nll(model, tokens[:32], 16, bos=0)
    assert a["windows"] == 2 and a["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing.txt"), "--ckpt", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing.txt" in err[0]


@pytest.mark.assets
def test_cli_on_the_default_model_packed_and_dequantized(smollm2_path, tmp_path, capsys):
    from llama_min import Llama

    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 6
    (tmp_path / "t.txt").write_text(text)
    results = {}
    for mode in ([], ["--dequantize"]):
        assert main(["--ckpt", str(smollm2_path), "--data", str(tmp_path / "t.txt"), "--ctx", "64", "--json",
                     "--no-progress", *mode]) == 0
        results[bool(mode)] = json.loads(capsys.readouterr().out)
    packed, floats = results[False], results[True]
    quantized = ("Int4Linear", "BlockLinear", "TiledLinear")  # (the file's blocks: runtime/blocks.py)
    assert set(quantized) & set(packed["layers"]) and not set(quantized) & set(floats["layers"])
    # independently: the float model, a plain forward per window, F.cross_entropy
    llama = Llama.build(smollm2_path, max_seq_len=64, device="cpu", dtype=torch.float32)
    tok = llama.tokenizer
    tokens = tok.encode(text, bos=tok.add_bos, eos=False)
    nll = independent_nll(llama.model, tokens, 64, bos=tok.bos_id) if tok.add_bos else None
    if nll is None:  # no BOS rule: windows are plain slices
        nll = []
        for s in range(0, len(tokens) - 63, 64):
            with torch.no_grad():
                lg = llama.model(torch.tensor([tokens[s : s + 64]]))[0]
            nll += F.cross_entropy(lg[32:63], torch.tensor(tokens[s + 33 : s + 64]), reduction="none").tolist()
    assert floats["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    print(f"[eval] packed {packed['perplexity']:.4f}, float32 {floats['perplexity']:.4f}")
    assert packed["perplexity"] == pytest.approx(floats["perplexity"], rel=0.05)
