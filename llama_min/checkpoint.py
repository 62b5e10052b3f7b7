"""Load and save checkpoints: Meta, Hugging Face, GGUF and our own format, into one internal form.

Internal form = Meta's: `ModelArgs` + a state dict with Meta's key names (`layers.N.attention.wq.weight`,
...) and Meta's q/k row order (RoPE pairs are adjacent rows 2i, 2i+1 of each head).

  Meta    params.json + consolidated.NN.pth (model-parallel shards merged here, on the CPU)
  HF      config.json + model*.safetensors (or pytorch_model*.bin); q/k rows un-permuted per head
  GGUF    one .gguf file; quantized tensors dequantized with the `gguf` package; q/k already Meta order
  own     params.json (ModelArgs) + model.safetensors with Meta names, written by `save_checkpoint`

Weights are memory-mapped where the format allows and converted one tensor at a time, so a load
never holds two full copies of the model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from .files import atomic_write
from .model import ModelArgs, Transformer

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
GGUF_TO_META = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
GGUF_LAYER_TO_META = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
# Model-parallel shard merge axes in Meta checkpoints (column-parallel: 0, row-parallel: 1).
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


# ----------------------------------------------------------------------------------------------
# Shapes and the q/k permutation
# ----------------------------------------------------------------------------------------------


def expected_shapes(args: ModelArgs) -> dict:
    """Every tensor a model with these args needs, Meta names -> shape."""
    d, hd, F = args.dim, args.hd, args.ffn_hidden
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,), "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
            p + "attention.wq.weight": (args.n_heads * hd, d), p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d), p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (F, d), p + "feed_forward.w3.weight": (F, d),
            p + "feed_forward.w2.weight": (d, F),
        })
    return shapes


def check_state_dict(args: ModelArgs, sd: dict, source) -> None:
    """Raise a ValueError naming the file and key for a missing, unexpected or misshapen tensor."""
    want = expected_shapes(args)
    for key, shape in want.items():
        if key not in sd:
            raise ValueError(f"{source}: missing tensor '{key}' (expected shape {list(shape)})")
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"{source}: tensor '{key}' has shape {list(sd[key].shape)}, expected {list(shape)}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ValueError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} unknown keys)")


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation: per head, HF row j*hd/2 + i holds Meta row 2i + j.

    HF implements RoPE as "rotate half" (feature i pairs with i + hd/2), Meta pairs 2i with 2i+1.
    View the rows as (heads, 2, hd/2), swap the last two axes, flatten. Use K heads for wk.
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_meta_qk`: per head, view rows as (hd/2, 2), swap, flatten."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _unpermute_inplace(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """hf_to_meta_qk written back into w's own memory (a memory-mapped private page becomes owned)."""
    try:
        return w.copy_(hf_to_meta_qk(w, n_heads))
    except RuntimeError:  # read-only storage
        return hf_to_meta_qk(w, n_heads).clone()


def build_transformer(args: ModelArgs, state_dict: dict, device=None, dtype=None) -> Transformer:
    """A Transformer holding these tensors, built on the meta device so no random init is allocated."""
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.tie_weights()
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Detection and the public entry point
# ----------------------------------------------------------------------------------------------


def detect_format(path) -> str:
    """'gguf' | 'own' | 'meta' | 'hf' for a checkpoint path, or a ValueError saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if _is_gguf(path):
            return "gguf"
        raise ValueError(f"{path}: not a GGUF file; expected a .gguf file or a checkpoint directory")
    if (path / "params.json").is_file() and (path / "model.safetensors").is_file():
        return "own"
    if (path / "params.json").is_file() and sorted(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    raise ValueError(
        f"{path}: not a known checkpoint; expected params.json + consolidated.*.pth (Meta), "
        "config.json + *.safetensors (Hugging Face), params.json + model.safetensors (llama_min) or a .gguf file"
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_checkpoint(path, dtype: Optional[torch.dtype] = None):
    """Load any supported checkpoint -> (ModelArgs, state dict with Meta names and Meta q/k layout).

    Tensors come as stored (GGUF: dequantized to float32) unless `dtype` is given. Tied embeddings
    appear as one tensor under both `tok_embeddings.weight` and `output.weight`.
    """
    path = Path(path)
    fmt = detect_format(path)
    loader = {"gguf": _load_gguf, "own": _load_own, "meta": _load_meta, "hf": _load_hf}[fmt]
    args, sd = loader(path, dtype)
    if "output.weight" not in sd and args.tie_word_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(args, sd, path)
    return args, sd


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _safetensors_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _torch_load(path: Path) -> dict:
    """A .pth/.bin state dict, memory-mapped, refusing anything but tensors (never unpickles code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load as a weights-only PyTorch file ({e})") from None


def _load_safetensors(path: Path, dtype) -> dict:
    """Tensors of one safetensors file, memory-mapped (copy-on-write) by the safetensors library."""
    f = _safetensors_open(path)
    try:
        return {k: _cast(f.get_tensor(k), dtype) for k in f.keys()}
    except Exception as e:  # a truncated file fails here
        raise ValueError(f"{path}: cannot read tensors ({e})") from None


# ----------------------------------------------------------------------------------------------
# Own format
# ----------------------------------------------------------------------------------------------


def _load_own(path: Path, dtype):
    args = ModelArgs.from_dict(_read_json(path / "params.json"))
    return args, _load_safetensors(path / "model.safetensors", dtype)


def save_checkpoint(out_dir, args: ModelArgs, state_dict: dict, tokenizer_files=()) -> Path:
    """Write the own format: model.safetensors (Meta names), then params.json, then tokenizer files.

    Every file is written atomically; params.json comes after the weights, so a directory with a
    params.json always holds complete weights. Tied output weights are stored once.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if args.tie_word_embeddings:
        tensors.pop("output.weight", None)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "llama_min"}))
    atomic_write(out / "params.json", lambda tmp: Path(tmp).write_text(json.dumps(args.to_dict(), indent=2)))
    for src in tokenizer_files:
        src = Path(src)
        atomic_write(out / src.name, lambda tmp: shutil.copyfile(src, tmp))
    return out


# ----------------------------------------------------------------------------------------------
# Meta: params.json + consolidated.NN.pth
# ----------------------------------------------------------------------------------------------


def _merge_shards(key: str, parts: list, dim: int, files) -> torch.Tensor:
    """Concatenate one tensor's model-parallel pieces along the axis its layer was split on."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].ndim == 1:  # norms are replicated on every shard
        return parts[0]
    kind = key.split(".")[-2]
    if kind == "tok_embeddings":  # Llama 1/2 split it by columns (dim 1), Llama 3 by rows (dim 0)
        axis = 0 if parts[0].shape[1] == dim else 1
    else:
        axis = SHARD_DIM.get(kind)
        if axis is None:
            raise ValueError(f"{files[0].parent}: no known shard merge rule for '{key}'")
    other = 1 - axis
    if any(p.shape[other] != parts[0].shape[other] for p in parts):
        shapes = [list(p.shape) for p in parts]
        raise ValueError(f"{files[0].parent}: shards disagree on '{key}': shapes {shapes}")
    return torch.cat(parts, dim=axis)


def _load_meta(path: Path, dtype):
    params = _read_json(path / "params.json")
    args = ModelArgs.from_dict(params)
    files = sorted(path.glob("consolidated.*.pth"))
    shards = [_torch_load(f) for f in files]
    keys = [k for k in shards[0] if k != "rope.freqs"]  # rope.freqs (Llama 1/2) is recomputed
    for f, s in zip(files[1:], shards[1:]):
        if set(k for k in s if k != "rope.freqs") != set(keys):
            raise ValueError(f"{f}: shards disagree: its tensor names differ from {files[0].name}")
    sd = {k: _cast(_merge_shards(k, [s[k] for s in shards], args.dim, files), dtype) for k in keys}
    if args.vocab_size <= 0 and "tok_embeddings.weight" in sd:
        args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    return args, sd


# ----------------------------------------------------------------------------------------------
# Hugging Face: config.json + safetensors / pytorch_model.bin
# ----------------------------------------------------------------------------------------------


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from an HF LlamaConfig dict (legacy rope_theta/rope_scaling or transformers-5 rope_parameters)."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("config.json: attention_bias/mlp_bias models are not Llama-architecture (no biases)")
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or rope
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json: rope type '{rope_type}' is not supported (only default and llama3)")
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


def hf_config_from_args(args: ModelArgs) -> dict:
    """An HF LlamaConfig dict for these args (what `scripts/convert.py --to hf` writes)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.hd,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings, "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    if args.use_scaled_rope:
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_pos,
        }
    if args.rope_freq_divisors is not None:
        raise ValueError("per-pair rope_freqs divisors (from GGUF) have no Hugging Face config equivalent")
    return cfg


def _hf_weight_files(path: Path) -> list:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            weight_map = _read_json(path / index).get("weight_map", {})
            return [path / name for name in dict.fromkeys(weight_map.values())]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("model-*.safetensors")) or sorted(path.glob("pytorch_model-*.bin"))
    if found:
        return found
    raise ValueError(f"{path}: config.json found but no model.safetensors / pytorch_model.bin weights")


def hf_to_meta_name(key: str) -> Optional[str]:
    """HF tensor name -> Meta name; None for keys to ignore; ValueError for unknown keys."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key in HF_TO_META:
        return HF_TO_META[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if m and m.group(2) in HF_LAYER_TO_META:
        return f"layers.{m.group(1)}.{HF_LAYER_TO_META[m.group(2)]}.weight"
    raise ValueError(f"unknown Hugging Face tensor '{key}'")


def _load_hf(path: Path, dtype):
    args = args_from_hf_config(_read_json(path / "config.json"))
    sd = {}
    for f in _hf_weight_files(path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in the index but missing")
        if f.suffix == ".safetensors":
            tensors = _load_safetensors(f, dtype)
        else:
            tensors = _torch_load(f)
        for key, t in tensors.items():
            try:
                name = hf_to_meta_name(key)
            except ValueError as e:
                raise ValueError(f"{f}: {e}") from None
            if name is None:
                continue
            if name.endswith("attention.wq.weight"):
                t = _unpermute_inplace(t, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = _unpermute_inplace(t, args.kv_heads)
            sd[name] = _cast(t, dtype)
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


def save_hf(out_dir, args: ModelArgs, state_dict: dict) -> Path:
    """Write config.json + model.safetensors that transformers' LlamaForCausalLM loads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, tensors = to_hf(args, state_dict)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))
    return out


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp)
# ----------------------------------------------------------------------------------------------


def args_from_gguf(meta: dict) -> ModelArgs:
    arch = meta.get("general.architecture", "llama")
    if arch != "llama":
        raise ValueError(f"GGUF architecture '{arch}' is not supported (expected 'llama')")

    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    rot = get("rope.dimension_count")
    return ModelArgs(
        dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        vocab_size=int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or -1)),
        hidden_dim=int(get("feed_forward_length")),
        head_dim=int(get("attention.key_length", rot or dim // n_heads)),
        norm_eps=float(f'{get("attention.layer_norm_rms_epsilon", 1e-5):.7g}'),  # stored as float32
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_seq_len=min(int(get("context_length", 2048)), 8192),
    )


def gguf_to_meta_name(name: str) -> Optional[str]:
    if name == "rope_freqs.weight":
        return None
    base, _, suffix = name.rpartition(".")
    if base in GGUF_TO_META:
        return f"{GGUF_TO_META[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in GGUF_LAYER_TO_META:
        return f"layers.{m.group(1)}.{GGUF_LAYER_TO_META[m.group(2)]}.{suffix}"
    raise ValueError(f"unknown GGUF tensor '{name}'")


def gguf_tensor(data, dims: tuple, ggml_type: int, offset: int, dtype) -> torch.Tensor:
    """Dequantize one GGUF tensor (at `offset` in the memory-mapped file `data`) to Meta's row-major shape."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(ggml_type)
    shape = tuple(int(s) for s in reversed(dims))  # GGUF lists dims innermost-first
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_bytes = int(np.prod(shape)) * type_size // block
    raw = data[offset : offset + n_bytes]
    if len(raw) != n_bytes:
        raise ValueError("tensor data runs past the end of the file (truncated download?)")
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
    else:  # blocks of bytes, one row of blocks per output row
        arr = raw.reshape(-1, shape[-1] * type_size // block)
    arr = dequantize(arr, qtype).reshape(shape)
    return _cast(torch.from_numpy(np.array(arr, dtype=np.float32, copy=False)), dtype or torch.float32)


def _load_gguf(path: Path, dtype):
    import numpy as np
    from tqdm import tqdm

    from .gguf_vocab import read_gguf_tensor_infos

    meta, infos = read_gguf_tensor_infos(path)
    args = args_from_gguf(meta)
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: float32 tensors stay views
    sd = {}
    for name, dims, ggml_type, offset in tqdm(infos, desc="dequantizing", unit="tensor", leave=False, disable=None):
        try:
            t = gguf_tensor(data, dims, ggml_type, offset, dtype)
            if name == "rope_freqs.weight":  # Llama 3.1+ scaling as per-pair divisors of theta_i
                args.rope_freq_divisors = [float(x) for x in t.float()]
                continue
            sd[gguf_to_meta_name(name)] = t
        except (ValueError, KeyError, NotImplementedError) as e:
            raise ValueError(f"{path}: tensor '{name}': {e}") from None
    if "output.weight" not in sd:
        args.tie_word_embeddings = True
    if args.vocab_size <= 0:
        args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    return args, sd
