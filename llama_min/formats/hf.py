"""Hugging Face's format: config.json + model*.safetensors (or old pytorch_model*.bin), and writing it.

Names map to Meta's; wq/wk rows are un-permuted per head (HF's "rotate half" RoPE pairs feature i with
i + hd/2, Meta pairs 2i with 2i+1), using K heads for wk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from ..errors import LlamaMinError
from ..files import atomic_write, read_json
from ..model import ModelArgs
from .common import (ConfigReader, build_args, cast, show, load_safetensors, meta_to_hf_qk, rope_scaling_desc,
                     rope_scaling_fields, torch_weights, unpermute_inplace)

HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


HF_LAYER_TO_META = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


# model_type / architectures whose math is Llama's (Mistral: plus a sliding window, handled below)
LLAMA_MODEL_TYPES = ("llama", "mistral")
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# ModelArgs field -> config.json key, so ModelArgs' own checks speak the file's words
HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "vocab_size": "vocab_size",
            "norm_eps": "rms_norm_eps", "max_seq_len": "max_position_embeddings"}


def check_llama_architecture(r: ConfigReader) -> None:
    """Refuse, naming the field and value, what is not computed exactly as Llama.

    model_type / architectures (Gemma's norm offset and embedding scale, Qwen2's biases, MoE, ...),
    hidden_act (SwiGLU uses SiLU), attention_bias / mlp_bias (Llama has no biases).
    """
    model_type = r.text("model_type", "llama")
    if model_type not in LLAMA_MODEL_TYPES:
        raise r.error("model_type", model_type, f"a Llama-architecture model ({' or '.join(LLAMA_MODEL_TYPES)})")
    archs = r.raw("architectures", None)
    if archs is not None:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise r.error("architectures", archs, "a list of class names")
        for arch in archs:
            if arch not in LLAMA_ARCHITECTURES:
                raise r.error("architectures", archs, f"a Llama-architecture model ({', '.join(LLAMA_ARCHITECTURES)})")
    for key in ("hidden_act", "hidden_activation"):
        act = r.text(key, "silu")
        if act != "silu":
            raise r.error(key, act, "\"silu\" (Llama's SwiGLU feed-forward)")
    for key in ("attention_bias", "mlp_bias"):
        if r.flag(key, False):
            raise r.error(key, True, "false (Llama has no biases)")


def _rope_settings(r: ConfigReader) -> dict:
    """rope_theta and the scaling (linear, dynamic, yarn, llama3) from transformers 4's rope_theta + rope_scaling
    ("type" or "rope_type") or transformers 5's rope_parameters, with transformers' defaults
    (common.rope_scaling_fields); the window they default to is max_position_embeddings (2048 when absent, as
    LlamaConfig). A top-level original_max_position_embeddings wins over the dict's, as in transformers."""
    params = r.raw("rope_parameters", None)
    if params is not None and not isinstance(params, dict):
        raise r.error("rope_parameters", params, "an object of RoPE settings")
    name = "rope_scaling" if r.raw("rope_scaling", None) is not None else "rope_parameters"
    desc = r.raw(name, None) or {}
    theta = r.number("rope_theta", None) or ConfigReader(params or {}, r.source, within="rope_parameters.").number(
        "rope_theta", 10000.0)
    top_original = r.int("original_max_position_embeddings", None)
    if top_original is not None and isinstance(desc, dict):
        desc = dict(desc, original_max_position_embeddings=top_original)
    window = r.int("max_position_embeddings", 2048)
    return {"rope_theta": theta, **rope_scaling_fields(desc, r.source, window, within=f"{name}.")}


def args_from_hf_config(cfg: dict, source="config.json") -> ModelArgs:
    """ModelArgs from an HF LlamaConfig / MistralConfig dict, every value type- and range-checked.

    Mistral's sliding_window is kept (ModelArgs.sliding_window): requests longer than the window are then
    refused when the model is built, because within the window the attention is exactly Llama's.
    """
    r = ConfigReader(cfg, source)
    check_llama_architecture(r)
    n_heads = r.int("num_attention_heads")
    window = r.int("sliding_window", None) if r.raw("model_type", None) == "mistral" else None  # Llama ignores it
    max_pos = min(r.int("max_position_embeddings", 2048), 8192, window or 8192)
    args = build_args(
        source, HF_NAMES,
        dim=r.int("hidden_size"), n_layers=r.int("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=r.int("num_key_value_heads", n_heads), vocab_size=r.int("vocab_size"),
        hidden_dim=r.int("intermediate_size"), head_dim=r.int("head_dim", None),
        norm_eps=r.number("rms_norm_eps", 1e-6), tie_word_embeddings=r.flag("tie_word_embeddings", False),
        max_seq_len=max_pos, sliding_window=window, trained_window=r.int("max_position_embeddings", None),
        **_rope_settings(r),
    )
    _check_special_ids(r, args.vocab_size)
    return args


def _check_special_ids(r: ConfigReader, vocab_size: int) -> None:
    """bos/eos token ids (an int or a list of ints, or null) must lie inside the vocabulary.

    (pad_token_id is not checked: early Llama conversions set it to -1, and nothing here uses it.)
    """
    for key in ("bos_token_id", "eos_token_id"):
        value = r.raw(key, None)
        for i in value if isinstance(value, list) else [value]:
            if i is None:
                continue
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
                raise r.error(key, value, f"token ids in 0..{vocab_size - 1} (vocab_size {vocab_size})")


def hf_config_from_args(args: ModelArgs, dtype: str = "float32") -> dict:
    """An HF LlamaConfig dict for these args (what `scripts/convert.py --to hf` writes).

    `dtype` names the stored weights' dtype under the key transformers 5 reads (older ones read
    `torch_dtype`, and fall back to float32 without it).
    """
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.hd,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings, "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "dtype": dtype,
    }
    if args.sliding_window is not None:  # transformers' Mistral masks keys older than the window; Llama has none
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=args.sliding_window)
    scaling = rope_scaling_desc(args)
    if scaling is not None:  # transformers 4 and 5 both read rope_scaling (with rope_theta on top)
        cfg["rope_scaling"] = scaling
        if args.rope_scaling_type == "dynamic":  # transformers' M is max_position_embeddings
            cfg["max_position_embeddings"] = args.rope_original_max_pos
    if args.rope_freq_divisors is not None:
        raise LlamaMinError("per-pair rope_freqs divisors (from GGUF) have no Hugging Face config equivalent")
    return cfg


def hf_weight_files(path: Path) -> list:
    """The weight files of a Hugging Face folder: those its index names, else the single or sharded files."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            weight_map = read_json(path / index, "index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise LlamaMinError(f"{path / index}: \"weight_map\": {show(weight_map)}; "
                                    "expected an object of tensor name -> file name")
            return [path / name for name in dict.fromkeys(weight_map.values())]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("model-*.safetensors")) or sorted(path.glob("pytorch_model-*.bin"))
    if found:
        return found
    raise LlamaMinError(f"{path}: config.json found but no model.safetensors / pytorch_model.bin weights")


def hf_to_meta_name(key: str) -> Optional[str]:
    """HF tensor name -> Meta name; None for keys to ignore; ValueError for unknown keys."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key in HF_TO_META:
        return HF_TO_META[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if m and m.group(2) in HF_LAYER_TO_META:
        return f"layers.{m.group(1)}.{HF_LAYER_TO_META[m.group(2)]}.weight"
    raise LlamaMinError(f"unknown Hugging Face tensor '{key}'")


def load_hf(path: Path, dtype):
    args = args_from_hf_config(read_json(path / "config.json", "config.json"), path / "config.json")
    sd = {}
    for f in hf_weight_files(path):
        if not f.is_file():
            raise LlamaMinError(f"{f}: listed in the index but missing")
        if f.suffix == ".safetensors":
            tensors = load_safetensors(f, dtype)
        else:
            tensors = torch_weights(f)
        for key, t in tensors.items():
            try:
                name = hf_to_meta_name(key)
            except ValueError as e:
                raise LlamaMinError(f"{f}: {e}") from None
            if name is None:
                continue
            if name.endswith("attention.wq.weight"):
                t = unpermute_inplace(t, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = unpermute_inplace(t, args.kv_heads)
            sd[name] = cast(t, dtype)
    _check_tied(args, sd, path)
    return args, sd


def _check_tied(args: ModelArgs, sd: dict, path: Path) -> None:
    """tie_word_embeddings with a separate, different lm_head on disk is ambiguous: transformers 4 ties
    (uses the embedding), transformers 5 keeps the lm_head. Refuse rather than pick one silently."""
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    if args.tie_word_embeddings and out is not None and emb is not None and out.shape == emb.shape:
        if not torch.equal(out, emb):
            raise LlamaMinError(f"{path / 'config.json'}: \"tie_word_embeddings\": true, but the weights hold a "
                                "separate lm_head.weight that differs from the embedding; expected one of the two")


def to_hf(args: ModelArgs, state_dict: dict):
    """(config dict, HF-named state dict with HF's q/k permutation) for saving a transformers folder."""
    meta_to_hf = {v: k for k, v in HF_TO_META.items()}
    layer_map = {v: k for k, v in HF_LAYER_TO_META.items()}
    out = {}
    for name, t in state_dict.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
        if m:
            hf = f"model.layers.{m.group(1)}.{layer_map[m.group(2)]}.weight"
            if m.group(2) == "attention.wq":
                t = meta_to_hf_qk(t, args.n_heads)
            elif m.group(2) == "attention.wk":
                t = meta_to_hf_qk(t, args.kv_heads)
        else:
            hf = meta_to_hf[name]
        out[hf] = t.detach().contiguous()
    return hf_config_from_args(args), out


def save_hf(out_dir, args: ModelArgs, state_dict: dict, tokenizer=None) -> Path:
    """Write config.json + model.safetensors that transformers' LlamaForCausalLM loads.

    With a llama_min `tokenizer`: also its file (unless one is already in `out_dir`), BOS/EOS ids in
    config.json, its chat template in tokenizer_config.json, and generation_config.json whose
    `eos_token_id` lists EOS and every end-of-turn id, so transformers' `generate` stops at the end of
    a chat turn (Llama 3: <|eot_id|>, ChatML: <|im_end|>) instead of writing the next turn itself.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, tensors = to_hf(args, state_dict)
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    cfg["dtype"] = str(floats[0] if floats else "float32").removeprefix("torch.")
    if tokenizer is not None:
        cfg.update(_tokenizer_ids(tokenizer))
        _save_tokenizer(out, tokenizer)
        path = out / "generation_config.json"  # a copied one keeps its sampling settings
        gen = read_json(path, "generation_config.json") if path.is_file() else {}
        gen.update(_tokenizer_ids(tokenizer), eos_token_id=_stop_ids(tokenizer))
        atomic_write(path, json.dumps(gen, indent=2))
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / "config.json", json.dumps(cfg, indent=2))
    return out


def _tokenizer_ids(tok) -> dict:
    return {f"{k}_token_id": i for k, i in (("bos", tok.bos_id), ("eos", tok.eos_id)) if i >= 0}


def _stop_ids(tok):
    """EOS first, then the other ids that end a turn; an int when there is only one."""
    ids = ([tok.eos_id] if tok.eos_id >= 0 else []) + sorted(tok.stop_ids - {tok.eos_id})
    return ids[0] if len(ids) == 1 else ids


def _save_tokenizer(out: Path, tok) -> None:
    """The tokenizer's file, and tokenizer_config.json with the special tokens' names (BOS, EOS, unknown,
    padding, ... as far as the tokenizer names them; names already there stay) and the chat template."""
    from ..text.hf_files import special_token_names

    if not any((out / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        tok.save(out)
    path = out / "tokenizer_config.json"
    config = read_json(path, "tokenizer_config.json") if path.is_file() else {}
    for key, name in special_token_names(tok).items():
        config.setdefault(key, name)
    config.setdefault("add_bos_token", bool(tok.add_bos))
    if getattr(tok, "chat_template", None) and not config.get("chat_template"):
        config["chat_template"] = tok.chat_template
    atomic_write(path, json.dumps(config, indent=2))
