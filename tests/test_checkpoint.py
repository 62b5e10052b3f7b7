"""Loading real checkpoint layouts: parity with transformers, Meta shards, own format, bad inputs."""

import json

import pytest
import torch

from _tiny import HF_CONFIGS, hf_logits, random_hf_model, write_meta_checkpoint
from llama_min import ModelArgs, load_checkpoint, save_checkpoint
from llama_min.checkpoint import build_transformer, hf_to_meta_qk, meta_to_hf_qk, save_hf

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
T = 80  # longer than original_max_position_embeddings (32) of the llama3-scaled configs


def ours(path, **kw):
    args, sd = load_checkpoint(path, **kw)
    return build_transformer(args, sd).eval()


def tokens(vocab=128, n=T, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Every tiny config saved by transformers' save_pretrained, with its oracle logits."""
    out = {}
    for name in HF_CONFIGS:
        model = random_hf_model(name)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, hf_logits(model, tokens()))
    return out


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_parity(hf_dirs, name):
    path, expected = hf_dirs[name]
    with torch.no_grad():
        got = ours(path)(tokens())
    diff = (got - expected).abs().max().item()
    print(f"[parity] {name}: max|dlogits| = {diff:.2e} (logit scale {expected.abs().max():.1f})")
    assert diff <= 1e-4


def test_negative_control_without_unpermute(hf_dirs, monkeypatch):
    """The parity test notices a loader that forgets to undo HF's q/k permutation."""
    path, expected = hf_dirs["gqa-5e5"]
    monkeypatch.setattr("llama_min.formats.hf.unpermute_inplace", lambda w, n_heads: w)
    with torch.no_grad():
        diff = (ours(path)(tokens()) - expected).abs().max().item()
    print(f"[parity] negative control (no unpermute): max|dlogits| = {diff:.2f}")
    assert diff > 1e-2


def test_wk_unpermuted_with_kv_heads_not_query_heads(hf_dirs, monkeypatch):
    """The classic GQA bug (H heads for wk) must give different logits."""
    path, expected = hf_dirs["gqa-5e5"]
    from llama_min.formats import hf

    real = hf.unpermute_inplace
    monkeypatch.setattr(hf, "unpermute_inplace", lambda w, n: real(w, 4))
    with torch.no_grad():
        assert (ours(path)(tokens()) - expected).abs().max().item() > 1e-2


def test_hf_args(hf_dirs):
    args, _ = load_checkpoint(hf_dirs["llama3-f32"][0])
    assert (args.use_scaled_rope, args.rope_scaling_factor, args.rope_original_max_pos) == (True, 32.0, 32)
    assert (args.n_heads, args.kv_heads, args.rope_theta, args.norm_eps) == (4, 1, 500000.0, 1e-5)
    args, _ = load_checkpoint(hf_dirs["head-dim-32"][0])
    assert args.hd == 32 and args.dim == 64


def test_hf_legacy_config_keys(hf_dirs, tmp_path):
    """Pre-5 configs: rope_theta + rope_scaling{type} instead of rope_parameters."""
    src, expected = hf_dirs["llama3-f8"]
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    with torch.no_grad():
        assert (ours(tmp_path)(tokens()) - expected).abs().max().item() <= 1e-4


def test_hf_sharded_safetensors_and_bin(tmp_path):
    model = random_hf_model("gqa-5e5", seed=3)
    expected = hf_logits(model, tokens())
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    with torch.no_grad():
        for path in (tmp_path / "sharded", binary):
            assert (ours(path)(tokens()) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("n_shards", [1, 2, 4])
@pytest.mark.parametrize("emb_dim", [0, 1])
def test_meta_shards(hf_dirs, tmp_path, n_shards, emb_dim):
    """The same weights as Meta consolidated.NN.pth files, split for model parallelism, load alike."""
    path, expected = hf_dirs["gqa-5e5"]
    args, sd = load_checkpoint(path)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
              "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "some_future_key": 1}
    # Meta's rule: int(2*4*64/3) = 170 -> rounded up to a multiple of 32 = 192; ours is 160, so state F.
    params["ffn_dim_multiplier"], params["multiple_of"] = 160 / 170, 16
    meta = write_meta_checkpoint(tmp_path / "meta", params, sd, n_shards, emb_dim)
    with torch.no_grad():
        diff = (ours(meta)(tokens()) - expected).abs().max().item()
    assert diff <= 1e-4


def test_meta_params_nested_under_model(hf_dirs, tmp_path):
    path, expected = hf_dirs["mha-1e4"]
    _, sd = load_checkpoint(path)
    params = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 128, "hidden_dim": 160,
                        "norm_eps": 1e-5, "unknown": "ignored"}}
    meta = write_meta_checkpoint(tmp_path / "meta", params, sd)
    with torch.no_grad():
        assert (ours(meta)(tokens()) - expected).abs().max().item() <= 1e-4


def test_meta_loads_with_weights_only(tmp_path, monkeypatch):
    """A pickle that would run code is refused (weights_only=True), as a clear ValueError."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "params.json").write_text('{"dim": 8, "n_layers": 1, "n_heads": 2}')
    torch.save({"x": Evil()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="consolidated.00.pth"):
        load_checkpoint(tmp_path)


def test_meta_shards_that_disagree(hf_dirs, tmp_path):
    _, sd = load_checkpoint(hf_dirs["mha-1e4"][0])
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 128, "hidden_dim": 160}
    meta = write_meta_checkpoint(tmp_path / "meta", params, sd, n_shards=2)
    shard = torch.load(meta / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = torch.zeros(32, 48)
    torch.save(shard, meta / "consolidated.01.pth")
    with pytest.raises(ValueError, match="shards disagree on 'layers.0.attention.wq.weight'"):
        load_checkpoint(meta)
    del shard["layers.0.attention.wq.weight"]
    torch.save(shard, meta / "consolidated.01.pth")
    with pytest.raises(ValueError, match="consolidated.01.pth: shards disagree"):
        load_checkpoint(meta)


def test_own_format_round_trip(hf_dirs, tmp_path):
    path, expected = hf_dirs["tied"]
    args, sd = load_checkpoint(path)
    save_checkpoint(tmp_path / "own", args, sd)
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["model.safetensors", "params.json"]
    args2, sd2 = load_checkpoint(tmp_path / "own")
    assert args2 == args
    with torch.no_grad():
        model = ours(tmp_path / "own")
        assert model.output.weight is model.tok_embeddings.weight
        assert (model(tokens()) - expected).abs().max().item() <= 1e-4


def test_convert_to_hf_loads_in_transformers(hf_dirs, tmp_path):
    from transformers import LlamaForCausalLM

    path, expected = hf_dirs["llama3-f32"]
    args, sd = load_checkpoint(path)
    save_hf(tmp_path / "hf", args, sd)
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    assert (hf_logits(back, tokens()) - expected).abs().max().item() <= 1e-5


def test_qk_permutation_round_trip():
    w = torch.randn(6 * 16, 40)
    assert torch.equal(hf_to_meta_qk(meta_to_hf_qk(w, 6), 6), w)
    assert torch.equal(meta_to_hf_qk(hf_to_meta_qk(w, 3), 3), w)
    # Within a head, Meta row 2i + j is HF row j*hd/2 + i.
    hf = meta_to_hf_qk(torch.arange(16.0)[:, None], 1)[:, 0]
    assert hf.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]


def test_bf16_load(hf_dirs):
    path, expected = hf_dirs["gqa-5e5"]
    args, sd = load_checkpoint(path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    with torch.no_grad():
        got = build_transformer(args, sd).eval()(tokens())
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 0.5


# ------------------------------------------------------------------------------------------------
# Bad inputs: one clear error naming the file/key
# ------------------------------------------------------------------------------------------------


def _copy_hf(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_error_missing_tensor(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy_hf(hf_dirs["mha-1e4"][0], tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'layers.1.feed_forward.w3.weight'"):
        load_checkpoint(d)


def test_error_wrong_shape(hf_dirs, tmp_path):
    d = _copy_hf(hf_dirs["mha-1e4"][0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'layers.0.feed_forward.w1.weight' has shape \[160, 64\], expected \[128, 64\]"):
        load_checkpoint(d)


def test_error_unknown_tensor(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy_hf(hf_dirs["mha-1e4"][0], tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: unknown Hugging Face tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_checkpoint(d)


def test_error_truncated_safetensors(hf_dirs, tmp_path):
    d = _copy_hf(hf_dirs["mha-1e4"][0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(d)


def test_error_unknown_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a known checkpoint; expected params.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_checkpoint(tmp_path / "notes.txt")


def test_ffn_hidden_sizes_of_real_models():
    """Meta's FFN rule reproduces the published sizes."""
    cases = [  # dim, multiple_of, ffn_dim_multiplier, expected F
        (4096, 256, None, 11008), (5120, 256, None, 13824), (8192, 4096, 1.3, 28672),
        (4096, 1024, 1.3, 14336), (2048, 256, 1.5, 8192), (3072, 256, 1.0, 8192),
    ]
    for dim, multiple_of, mult, want in cases:
        assert ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=mult).ffn_hidden == want
