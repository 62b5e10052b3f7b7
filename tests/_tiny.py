"""Tiny random Llama models for tests: transformers' LlamaForCausalLM as the independent oracle."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The tiny reference model every test builds from (GQA: 4 query heads share 2 KV heads).
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=160, max_seq_len=128)


def tiny_model(seed: int = 0, scale: float = 0.15, **over):
    """A llama_min Transformer of TINY's shape (overridable), every weight random: matrices N(0, scale),
    norm weights around 1, so no test passes by a weight being exactly one or zero."""
    from llama_min import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**dict(TINY, **over))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0, scale)
    return model


def rand_tokens(batch: int = 2, n: int = 40, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))

# Tiny configs covering what real checkpoints vary: MHA/GQA, rope base, llama3 scaling (factor 8 and
# 32, with original_max_position_embeddings small so test sequences pass it), tied output, head_dim.
HF_CONFIGS = {
    "mha-1e4": dict(num_key_value_heads=4, rope_theta=10000.0),
    "gqa-5e5": dict(num_key_value_heads=2, rope_theta=500000.0),
    "llama3-f8": dict(num_key_value_heads=2, rope_theta=500000.0, scaling=8.0),
    "llama3-f32": dict(num_key_value_heads=1, rope_theta=500000.0, scaling=32.0),
    "tied": dict(num_key_value_heads=2, rope_theta=100000.0, tie_word_embeddings=True),
    "head-dim-32": dict(num_key_value_heads=2, rope_theta=10000.0, head_dim=32),
}


def hf_config(name: str, **over):
    from transformers import LlamaConfig

    spec = dict(HF_CONFIGS[name], **over)
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
    factor = spec.pop("scaling", None)
    if factor:
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32)
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False)
    base.update(spec)
    return LlamaConfig(rope_parameters=rope, **base)


def random_hf_model(name: str, seed: int = 0, **over):
    """A float32 LlamaForCausalLM with every weight random (norm weights too, around 1)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(name, **over)).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def write_meta_checkpoint(path: Path, params: dict, state_dict: dict, n_shards: int = 1, emb_dim: int = 1):
    """Write params.json + consolidated.NN.pth split like Meta's model-parallel files.

    Column-parallel (wq wk wv w1 w3 output) split on dim 0, row-parallel (wo w2) on dim 1, the
    embedding on `emb_dim` (1 for Llama 1/2, 0 for Llama 3), norms replicated.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    axes = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": emb_dim}
    shards = [{} for _ in range(n_shards)]
    for key, t in state_dict.items():
        kind = key.split(".")[-2]
        if t.ndim == 1 or n_shards == 1:
            pieces = [t.clone() for _ in range(n_shards)]
        else:
            pieces = [p.clone() for p in t.chunk(n_shards, dim=axes[kind])]
        for shard, piece in zip(shards, pieces):
            shard[key] = piece
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.ones(8)  # Llama 1/2 files carry this; loaders must ignore it
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return path
