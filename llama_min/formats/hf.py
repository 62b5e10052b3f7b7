"""Hugging Face's format: config.json + model*.safetensors (or old pytorch_model*.bin), and writing it.

Names map to Meta's; wq/wk rows are un-permuted per head (HF's "rotate half" RoPE pairs feature i with
i + hd/2, Meta pairs 2i with 2i+1), using K heads for wk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..errors import LlamaMinError
from ..files import atomic_write, read_json
from ..model import ModelArgs
from .common import cast, load_safetensors, meta_to_hf_qk, torch_load, unpermute_inplace

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


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from an HF LlamaConfig dict (legacy rope_theta/rope_scaling or transformers-5 rope_parameters)."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise LlamaMinError("config.json: attention_bias/mlp_bias models are not Llama-architecture (no biases)")
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or rope
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "llama3"):
        raise LlamaMinError(f"config.json: rope type '{rope_type}' is not supported (only default and llama3)")
    args = ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], head_dim=cfg.get("head_dim"),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=min(int(cfg.get("max_position_embeddings", 2048)), 8192),
    )
    if rope_type == "llama3":
        args.use_scaled_rope = True
        args.rope_scaling_factor = float(scaling["factor"])
        args.rope_low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        args.rope_high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        args.rope_original_max_pos = int(scaling.get("original_max_position_embeddings", 8192))
    return args


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
    if args.use_scaled_rope:
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_pos,
        }
    if args.rope_freq_divisors is not None:
        raise LlamaMinError("per-pair rope_freqs divisors (from GGUF) have no Hugging Face config equivalent")
    return cfg


def _hf_weight_files(path: Path) -> list:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            weight_map = read_json(path / index, "index").get("weight_map", {})
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
    args = args_from_hf_config(read_json(path / "config.json", "config.json"))
    sd = {}
    for f in _hf_weight_files(path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in the index but missing")
        if f.suffix == ".safetensors":
            tensors = load_safetensors(f, dtype)
        else:
            tensors = torch_load(f)
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
    return args, sd


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
    """The tokenizer's file, and tokenizer_config.json with BOS/EOS names and the chat template."""
    if not any((out / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        tok.save(out)
    path = out / "tokenizer_config.json"
    config = read_json(path, "tokenizer_config.json") if path.is_file() else {}
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        name = _token_text(tok, i)
        if key not in config and name is not None:
            config[key] = name
    config.setdefault("add_bos_token", bool(tok.add_bos))
    if getattr(tok, "chat_template", None) and not config.get("chat_template"):
        config["chat_template"] = tok.chat_template
    atomic_write(path, json.dumps(config, indent=2))


def _token_text(tok, i: int):
    if i < 0:
        return None
    if tok.kind == "sentencepiece":
        return tok.sp.id_to_piece(i)
    if tok.kind == "tokenizers":
        return tok.tk.id_to_token(i)
    return {v: k for k, v in getattr(tok, "specials", {}).items()}.get(i)
