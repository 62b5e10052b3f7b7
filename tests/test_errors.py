"""Bad inputs end in one LlamaMinError line naming the file and the key; what is not Llama is refused.

Every error test checks the whole contract: the project's own error type, one line, the file named, the
key (or tensor, or field and value) named. The non-Llama tests build tiny Gemma-, Qwen2- and Mistral-shaped
models with transformers' own config classes and either match transformers or are refused.
"""

import json

import numpy as np
import pytest
import torch

from _tiny import random_hf_model
from llama_min import load_checkpoint
from llama_min.checkpoint import build_transformer
from llama_min.errors import LlamaMinError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PARAMS = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 16, "hidden_dim": 48,
          "norm_eps": 1e-5, "rope_theta": 10000.0}


def refused(load, *names) -> str:
    """Run `load()`; it must raise LlamaMinError, one line, naming every string in `names`."""
    with pytest.raises(LlamaMinError) as info:
        load()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def tiny_state_dict(params=PARAMS, seed=0):
    """Random weights with Meta's names for `params` (independent of the loaders: shapes written out here)."""
    g = torch.Generator().manual_seed(seed)
    d, v, f, hd = params["dim"], params["vocab_size"], params["hidden_dim"], params["dim"] // params["n_heads"]
    kv = params.get("n_kv_heads") or params["n_heads"]
    sd = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd.update({p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                   p + "attention.wq.weight": (d, d), p + "attention.wk.weight": (kv * hd, d),
                   p + "attention.wv.weight": (kv * hd, d), p + "attention.wo.weight": (d, d),
                   p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w3.weight": (f, d),
                   p + "feed_forward.w2.weight": (d, f)})
    return {k: torch.randn(shape, generator=g) * 0.1 for k, shape in sd.items()}


def write_own(path, params=PARAMS, sd=None, raw_params=None):
    """A llama_min folder: params.json (or raw bytes) + model.safetensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(sd if sd is not None else tiny_state_dict(), str(path / "model.safetensors"))
    (path / "params.json").write_bytes(raw_params if raw_params is not None else json.dumps(params).encode())
    return path


GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def gguf_name(meta_name: str) -> str:
    parts = meta_name.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{GGUF_NAMES['.'.join(parts[2:-1])]}.weight"
    return f"{GGUF_NAMES[parts[0]]}.weight"


def write_gguf(path, arch="llama", extra=(), sd=None, params=PARAMS, int_tensor=None):
    """A tiny float32 GGUF written by the gguf package's GGUFWriter; `extra` = [(key, value)] metadata."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    for key, value in [("embedding_length", params["dim"]), ("block_count", params["n_layers"]),
                       ("feed_forward_length", params["hidden_dim"]), ("attention.head_count", params["n_heads"]),
                       ("attention.head_count_kv", params["n_kv_heads"]), ("context_length", 64),
                       ("vocab_size", params["vocab_size"])]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", params["norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", params["rope_theta"])
    for key, value in extra:
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    for name, t in (sd if sd is not None else tiny_state_dict(params)).items():
        arr = t.float().numpy()
        if name == int_tensor:
            w.add_tensor(gguf_name(name), arr.astype(np.int32), raw_dtype=Q.I32)
        else:
            w.add_tensor(gguf_name(name), arr, raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------------ params.json

@pytest.mark.parametrize("change, key", [
    ({"dim": "32"}, '"dim": "32"'),
    ({"dim": None}, '"dim"'),
    ({"n_heads": 0}, '"n_heads": 0'),
    ({"n_layers": True}, '"n_layers": true'),
    ({"norm_eps": -1.0}, '"norm_eps": -1.0'),
    ({"rope_theta": "1e4"}, '"rope_theta"'),
    ({"use_scaled_rope": "false"}, '"use_scaled_rope": "false"'),
    ({"ffn_dim_multiplier": [1.3]}, '"ffn_dim_multiplier"'),
    ({"n_kv_heads": 3}, "n_heads 2 must be a multiple of n_kv_heads 3"),
    ({"dim": 34}, "dim 34 divisible by n_heads"),
    ({"use_scaled_rope": True, "rope_low_freq_factor": 4.0}, "high_freq_factor > low_freq_factor"),
])
def test_bad_params_json(tmp_path, change, key):
    params = dict(PARAMS, **change)
    if change.get("dim") is None and "dim" in change:
        params["dim"] = None
    path = write_own(tmp_path / "m", params)
    refused(lambda: load_checkpoint(path), "params.json", key)


def test_params_json_missing_key_array_and_bytes(tmp_path):
    params = dict(PARAMS)
    del params["n_layers"]
    refused(lambda: load_checkpoint(write_own(tmp_path / "a", params)), "params.json", '"n_layers"', "missing")
    path = write_own(tmp_path / "b", raw_params=b"[1, 2, 3]")
    refused(lambda: load_checkpoint(path), "params.json", "expected a JSON object")
    path = write_own(tmp_path / "c", raw_params=b'{"dim": 32, "n\xff": 1}')
    refused(lambda: load_checkpoint(path), "params.json", "not UTF-8")
    path = write_own(tmp_path / "d", raw_params=b'{"dim": 32,')
    refused(lambda: load_checkpoint(path), "params.json", "invalid JSON")


def test_good_params_json_loads(tmp_path):
    """The control: the same folder with valid params loads (so the refusals above are about the values)."""
    args, sd = load_checkpoint(write_own(tmp_path / "m"))
    assert (args.dim, args.kv_heads, args.vocab_size) == (32, 1, 16)
    assert args.hd == 16 and sd["layers.0.attention.wk.weight"].shape == (16, 32)


# ------------------------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_or_bool_weights_refused(tmp_path, dtype):
    sd = tiny_state_dict()
    sd["layers.0.attention.wq.weight"] = torch.ones(32, 32, dtype=dtype)
    path = write_own(tmp_path / "m", sd=sd)
    refused(lambda: load_checkpoint(path, dtype=torch.float32), "model.safetensors",
            "'layers.0.attention.wq.weight'", "expected floating point")


def test_integer_weights_refused_in_meta_pth_and_gguf(tmp_path):
    sd = tiny_state_dict()
    sd["norm.weight"] = torch.ones(32, dtype=torch.int64)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text(json.dumps(PARAMS))
    torch.save(sd, tmp_path / "meta" / "consolidated.00.pth")
    refused(lambda: load_checkpoint(tmp_path / "meta"), "consolidated.00.pth", "'norm.weight'", "int64")
    path = write_gguf(tmp_path / "i.gguf", int_tensor="layers.0.feed_forward.w2.weight")
    refused(lambda: load_checkpoint(path), "i.gguf", "blk.0.ffn_down.weight", "I32")


def test_refused_pickle_is_one_line(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    torch.save({"x": Evil()}, tmp_path / "consolidated.00.pth")
    msg = refused(lambda: load_checkpoint(tmp_path), "consolidated.00.pth", "refused", "system")
    assert "weights_only=False" not in msg


# ---------------------------------------------------------------------------------------- config.json

def _hf_dir(tmp_path, name="mha-1e4", **cfg_changes):
    """A tiny transformers-saved Llama folder, with config.json keys replaced (None deletes the key)."""
    path = tmp_path / "hf"
    random_hf_model(name).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    for key, value in cfg_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("changes, names", [
    ({"hidden_size": None}, ['missing key "hidden_size"']),
    ({"num_attention_heads": 0}, ['"num_attention_heads": 0']),
    ({"vocab_size": "128"}, ['"vocab_size": "128"']),
    ({"num_key_value_heads": 3}, ["num_attention_heads 4 must be a multiple of num_key_value_heads 3",
                                  "head dim (16)"]),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, ['"rope_parameters.factor"']),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0}}, ['"longrope"', "linear, dynamic, yarn"]),
    ({"rope_scaling": "llama3"}, ['"rope_scaling": "llama3"']),
    ({"hidden_act": "gelu"}, ['"hidden_act": "gelu"', "silu"]),
    ({"attention_bias": True}, ['"attention_bias": true']),
    ({"mlp_bias": True}, ['"mlp_bias": true']),
    ({"tie_word_embeddings": "yes"}, ['"tie_word_embeddings": "yes"']),
    ({"model_type": "gemma"}, ['"model_type": "gemma"']),
    ({"architectures": ["Qwen2ForCausalLM"]}, ['"architectures": ["Qwen2ForCausalLM"]']),
    ({"bos_token_id": 128}, ['"bos_token_id": 128', "vocab_size 128"]),
    ({"eos_token_id": [2, -1]}, ['"eos_token_id": [2, -1]']),
])
def test_bad_config_json(tmp_path, changes, names):
    path = _hf_dir(tmp_path, **changes)
    refused(lambda: load_checkpoint(path), "config.json", *names)


def test_config_json_not_an_object(tmp_path):
    path = _hf_dir(tmp_path)
    (path / "config.json").write_text("[1, 2]")
    refused(lambda: load_checkpoint(path), "config.json", "expected a JSON object")


# ------------------------------------------------------------------------------------------------ GGUF

def test_gguf_loads_and_matches_own_format(tmp_path):
    """The control for the GGUF refusals: the same writer's plain llama file loads to the same weights."""
    sd = tiny_state_dict()
    args, got = load_checkpoint(write_gguf(tmp_path / "ok.gguf", sd=sd))
    assert (args.dim, args.n_heads, args.kv_heads, args.ffn_hidden) == (32, 2, 1, 48)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("arch, extra, names", [
    ("gemma", [], ['"general.architecture": "gemma"']),
    ("qwen2", [], ['"general.architecture": "qwen2"']),
    ("llama", [("llama.expert_count", 8)], ['"llama.expert_count": 8']),
    ("llama", [("llama.rope.scaling.type", "longrope")], ['"llama.rope.scaling.type": "longrope"', '"linear", "yarn"']),
    ("llama", [("llama.rope.dimension_count", 8)], ['"llama.rope.dimension_count": 8']),
    ("llama", [("llama.attention.head_count_kv", 0)], ['"llama.attention.head_count_kv": 0']),
    ("llama", [("tokenizer.ggml.bos_token_id", 16)], ['"tokenizer.ggml.bos_token_id": 16', "vocabulary size 16"]),
])
def test_gguf_not_llama_refused(tmp_path, arch, extra, names):
    path = write_gguf(tmp_path / "x.gguf", arch=arch, extra=extra)
    refused(lambda: load_checkpoint(path), "x.gguf", *names)


# ------------------------------------------------------------------------------ not Llama: refused or exact

def _save(model, path):
    model.save_pretrained(path)
    return path


def _randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0.0, 0.1)
    return model.float().eval()


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)


def test_gemma_refused(tmp_path):
    """Gemma adds 1 to its norm weights and scales embeddings by sqrt(d): loading it as Llama is wrong."""
    from transformers import GemmaConfig, GemmaForCausalLM

    path = _save(_randomize(GemmaForCausalLM(GemmaConfig(head_dim=16, **TINY))), tmp_path / "gemma")
    refused(lambda: load_checkpoint(path), "config.json", '"model_type": "gemma"')
    cfg = json.loads((path / "config.json").read_text())  # disguised as Llama: its activation still gives it away
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (path / "config.json").write_text(json.dumps(cfg))
    refused(lambda: load_checkpoint(path), "config.json", '"hidden_act": "gelu_pytorch_tanh"')


def test_qwen2_refused(tmp_path):
    """Qwen2 has q/k/v biases: refused by its model_type, and by its bias tensors if disguised as Llama."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = _save(_randomize(Qwen2ForCausalLM(Qwen2Config(**TINY))), tmp_path / "qwen2")
    refused(lambda: load_checkpoint(path), "config.json", '"model_type": "qwen2"')
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (path / "config.json").write_text(json.dumps(cfg))
    refused(lambda: load_checkpoint(path), "model.safetensors", "unknown Hugging Face tensor", "_proj.bias")


def _mistral(tmp_path, window):
    from transformers import MistralConfig, MistralForCausalLM

    model = _randomize(MistralForCausalLM(MistralConfig(sliding_window=window, head_dim=16, **TINY)))
    return model, _save(model, tmp_path / f"mistral-{window}")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_mistral_without_window_matches_transformers(tmp_path):
    model, path = _mistral(tmp_path, None)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    args, sd = load_checkpoint(path)
    assert args.sliding_window is None
    with torch.no_grad():
        diff = (build_transformer(args, sd)(ids) - _logits(model, ids)).abs().max().item()
    assert diff <= 1e-4


def test_mistral_window_exact_inside_refused_beyond(tmp_path):
    """Within the window Mistral is Llama (matches transformers); a longer context is refused in one line.

    The negative control shows the refusal is needed: past the window transformers' logits differ from
    full causal attention.
    """
    window = 16
    model, path = _mistral(tmp_path, window)
    args, sd = load_checkpoint(path)
    assert (args.sliding_window, args.max_seq_len) == (window, window)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = build_transformer(args, sd)(ids[:, :window])
    assert (ours - _logits(model, ids[:, :window])).abs().max().item() <= 1e-4

    args.max_seq_len = window + 1
    refused(lambda: build_transformer(args, sd), "max_seq_len 17", "sliding_window 16")

    args.sliding_window, args.max_seq_len = None, 64  # negative control: full attention past the window
    with torch.no_grad():
        full = build_transformer(args, sd)(ids)
    assert (full - _logits(model, ids)).abs()[:, window:].max().item() > 1e-2


def test_sliding_window_survives_own_and_hf_round_trip(tmp_path):
    from llama_min import save_checkpoint
    from llama_min.checkpoint import save_hf

    _, path = _mistral(tmp_path, 16)
    args, sd = load_checkpoint(path)
    save_checkpoint(tmp_path / "own", args, sd)
    assert load_checkpoint(tmp_path / "own")[0].sliding_window == 16
    save_hf(tmp_path / "hf", args, sd)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["model_type"], cfg["sliding_window"]) == ("mistral", 16)
    assert load_checkpoint(tmp_path / "hf")[0].sliding_window == 16


def test_tied_embeddings_with_a_different_lm_head_refused(tmp_path):
    """tie_word_embeddings=true plus a different lm_head on disk: transformers 4 and 5 disagree; refused.

    The same lm_head equal to the embedding (as some exporters write it) loads and matches transformers.
    """
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    model = random_hf_model("tied")
    path = _save(model, tmp_path / "tied")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    args, sd = load_checkpoint(path)
    with torch.no_grad():
        ours = build_transformer(args, sd)(ids)
    theirs = _logits(LlamaForCausalLM.from_pretrained(path).float().eval(), ids)
    assert (ours - theirs).abs().max().item() <= 1e-4

    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    refused(lambda: load_checkpoint(path), "config.json", '"tie_word_embeddings": true', "lm_head.weight")


def test_padded_vocabulary_loads_and_generates(tmp_path, fixtures_dir):
    """A model with more embedding rows than the tokenizer has pieces (padded, as many checkpoints are)
    loads, and generation never hands the tokenizer an id it does not have."""
    import shutil

    from llama_min import Llama

    params = dict(PARAMS, vocab_size=32064)  # the Mistral tokenizer has 32000 pieces
    sd = tiny_state_dict(params)
    sd["output.weight"].zero_()
    sd["output.weight"][32050], sd["output.weight"][32051] = 10.0, -10.0  # one of two padding rows wins
    path = write_own(tmp_path / "m", params, sd)
    shutil.copyfile(fixtures_dir / "mistral-tokenizer.model.v1", path / "tokenizer.model")
    llama = Llama.build(path, max_seq_len=32, device="cpu", dtype=torch.float32)
    out = llama.text_completion(["Hello"], max_gen_len=3, temperature=0)
    assert isinstance(out[0]["generation"], str)
