"""Inside a real model: the numbers behind `llama-min inspect`'s pictures, from one float32 pass of model.py.

The model runs exactly as written (its own `forward`, no cache); forward hooks read what it computes:

  tok_embeddings, each TransformerBlock   the residual stream h_j after j blocks (j = 0: the embeddings)
  each layer's attention.wq / .wk         q and k as projected, *before* RoPE (T, heads, hd)
  each layer's attention (its inputs)     the freqs_cis rows and the causal mask the model passed to it

From those, with model.py's own functions (apply_rotary_emb, repeat_kv, causal_mask, the final norm and
output projection), `inspect_model` computes, for T prompt tokens, L layers, H heads, K kv heads, hd head dim:

  attention        (L, H, T, T)   softmax(q k^T / sqrt(hd) + causal mask), q and k after RoPE, float32
  distance_mass    (L, H, T)      [l, h, d] = mean over t >= d of attention[l, h, t, t - d]
  rope_pair_q_norm (L, H, hd/2)   [l, h, i] = mean over t of |(q[2i], q[2i+1])|, q before rotation
  rope_pair_k_norm (L, K, hd/2)   the same for the keys
  logit_lens_top   (L+1, T)       argmax softmax(output(norm(h_j)))[t]: row L is the model's own prediction
  logit_lens_prob  (L+1, T)       that token's probability

`save_npz` writes them (plus what the pictures need to stand alone: token texts, wavelengths, the trained
window) to inspect.npz; llama_min/inspect/pictures.py reads it back (load_npz) and draws from it alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..files import atomic_write
from ..model import Transformer, apply_rotary_emb, causal_mask, repeat_kv, rope_frequencies

MAX_TOKENS = 512  # attention is L*H*T*T floats; the pictures are unreadable long before this


def capture(model: Transformer, tokens: torch.Tensor) -> dict:
    """Run `model(tokens[None])` once with hooks; returns what they read, batch dimension dropped.

    residual: L+1 tensors (T, D); q: L tensors (T, H, hd); k: L tensors (T, K, hd); logits: (T, V);
    freqs_cis: (T, hd/2) and mask: (T, T) or None, as the model handed them to its attention layers.
    """
    check_reference(model)
    seen = {"residual": [], "q": [], "k": []}

    def keep_rope(module, inputs):  # Attention.forward(x, start_pos, freqs_cis, mask)
        seen["freqs_cis"], seen["mask"] = inputs[2], inputs[3]

    def keep(name, heads=None):
        def hook(module, inputs, output):
            x = output.detach()[0]  # (T, D) or (T, heads*hd)
            seen[name].append(x if heads is None else x.view(x.shape[0], heads, -1))
        return hook

    handles = [model.tok_embeddings.register_forward_hook(keep("residual")),
               model.layers[0].attention.register_forward_pre_hook(keep_rope)]
    for layer in model.layers:
        att = layer.attention
        handles += [layer.register_forward_hook(keep("residual")),
                    att.wq.register_forward_hook(keep("q", att.n_heads)),
                    att.wk.register_forward_hook(keep("k", att.n_kv_heads))]
    try:
        with torch.no_grad():
            seen["logits"] = model(tokens[None])[0]  # (T, V): the model's own forward, unchanged
    finally:
        for handle in handles:
            handle.remove()
    return seen


def check_reference(model: Transformer) -> None:
    """inspect reads model.py's own float32 layers; a transformed (fused, quantized) model has other ones."""
    if not all(isinstance(layer.attention.wq, nn.Linear) and isinstance(layer.attention.wk, nn.Linear)
               for layer in model.layers):
        raise ValueError("inspect needs model.py's own layers (build with optimize=False, no quantization)")
    if model.norm.weight.dtype != torch.float32:
        raise ValueError(f"inspect computes in float32; the model is {model.norm.weight.dtype}")


def attention_probs(q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor, n_rep: int,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each head's attention probabilities (H, T, T) from q (T, H, hd) and k (T, K, hd) before RoPE.

    softmax(q_rot k_rot^T / sqrt(hd) + mask), as model.attention_math computes them (softmax in float32);
    mask None: the causal mask.
    """
    T, _, hd = q.shape
    q_rot, k_rot = apply_rotary_emb(q[None], k[None], freqs_cis)  # (1, T, H, hd), (1, T, K, hd)
    k_rot = repeat_kv(k_rot, n_rep)[0].transpose(0, 1)  # (H, T, hd): query head h reads kv head h // n_rep
    q_rot = q_rot[0].transpose(0, 1)  # (H, T, hd)
    mask = causal_mask(T, 0, q.device) if mask is None else mask  # (T, T): -inf above the diagonal
    scores = q_rot @ k_rot.transpose(-2, -1) / math.sqrt(hd) + mask  # (H, T, T)
    return torch.softmax(scores.float(), dim=-1)


def distance_mass(attention: torch.Tensor) -> torch.Tensor:
    """(..., T, T) -> (..., T): [d] = mean over t >= d of attention[t, t - d] (the d-th diagonal below)."""
    T = attention.shape[-1]
    return torch.stack([attention.diagonal(offset=-d, dim1=-2, dim2=-1).mean(-1) for d in range(T)], dim=-1)


def pair_lengths(x: torch.Tensor) -> torch.Tensor:
    """x (T, heads, hd) -> (heads, hd/2): mean over t of |(x[2i], x[2i+1])|, Meta's adjacent RoPE pairs."""
    T, heads, hd = x.shape
    return x.view(T, heads, hd // 2, 2).norm(dim=-1).mean(0)


def logit_lens(model: Transformer, residual: list) -> tuple:
    """Top token and its probability (L+1, T) each: p_j = softmax(output(norm(h_j))) for every h_j."""
    top, prob = [], []
    with torch.no_grad():
        for h in residual:  # (T, D), one row of the grid at a time: (T, V) logits, not (L+1, T, V)
            p = torch.softmax(model.output(model.norm(h)).float(), dim=-1)  # (T, V)
            best = p.max(dim=-1)
            top.append(best.indices)
            prob.append(best.values)
    return torch.stack(top), torch.stack(prob)


def inspect_model(model: Transformer, tokens) -> dict:
    """All the numbers of the module docstring for a 1-D list/tensor of token ids, as numpy arrays."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    T = len(tokens)
    if not 1 <= T <= min(MAX_TOKENS, model.freqs_cis.shape[0]):
        raise ValueError(f"inspect takes 1 to {min(MAX_TOKENS, model.freqs_cis.shape[0])} tokens, got {T}")
    seen = capture(model, tokens)
    freqs_cis, mask = seen["freqs_cis"], seen["mask"]  # what the forward used: (T, hd/2), (T, T) or None
    n_rep = model.params.n_heads // model.params.kv_heads
    with torch.no_grad():
        attention = torch.stack([attention_probs(q, k, freqs_cis, n_rep, mask)
                                 for q, k in zip(seen["q"], seen["k"])])  # (L, H, T, T)
    top, prob = logit_lens(model, seen["residual"])
    out = dict(tokens=tokens, attention=attention, distance_mass=distance_mass(attention),  # (L, H, T, T), (L, H, T)
               rope_pair_q_norm=torch.stack([pair_lengths(q) for q in seen["q"]]),  # (L, H, hd/2)
               rope_pair_k_norm=torch.stack([pair_lengths(k) for k in seen["k"]]),  # (L, K, hd/2)
               logit_lens_top=top, logit_lens_prob=prob,  # (L+1, T) each
               rope_wavelength=2 * math.pi / rope_frequencies(model.params),  # (hd/2,) tokens per turn of pair i
               trained_window=torch.tensor(model.params.trained_window or 0))  # 0 = the file does not say
    return {name: value.cpu().numpy() for name, value in out.items()}


def token_text(tokenizer, ids) -> np.ndarray:
    """Each id decoded alone, whitespace made visible (space ␣, newline ↵, tab →), as a numpy str array."""
    def shown(i: int) -> str:
        text = tokenizer.decode([int(i)])
        return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "→") or f"<{int(i)}>"
    ids = np.asarray(ids)
    return np.array([shown(i) for i in ids.flatten()], dtype=str).reshape(ids.shape)


def add_texts(numbers: dict, tokenizer) -> dict:
    """The numbers plus token_text (T,) and logit_lens_text (L+1, T): labels the pictures need."""
    return dict(numbers, token_text=token_text(tokenizer, numbers["tokens"]),
                logit_lens_text=token_text(tokenizer, numbers["logit_lens_top"]))


def save_npz(path, arrays: dict) -> Path:
    """Write the arrays to `path` (compressed .npz, atomically; str arrays stay plain numpy, no pickle)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a temp name
            np.savez_compressed(f, **arrays)
    return atomic_write(path, write)


def reference_model(path, n_tokens: int) -> Transformer:
    """model.py's Transformer in float32 holding the checkpoint's weights (a quantized GGUF dequantized),
    its RoPE table sized to the prompt (the frequencies, and so every number, do not depend on that size)."""
    from dataclasses import replace

    from ..checkpoint import build_transformer, load_checkpoint

    args, state_dict = load_checkpoint(path, dtype=torch.float32)
    args = replace(args, max_seq_len=max(1, n_tokens))
    return build_transformer(args, state_dict, dtype=torch.float32).eval()


def inspect_prompt(path, prompt: str, tokenizer=None) -> dict:
    """The npz's arrays for `prompt` run through checkpoint `path` (tokenizer: found beside it by default),
    after a BOS when the tokenizer adds one to plain text (as generate does)."""
    from ..text.tokenizer import load_tokenizer

    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, Path)) \
        else load_tokenizer(tokenizer or path)
    ids = tok.encode(prompt, bos=tok.add_bos, eos=False)
    if not 1 <= len(ids) <= MAX_TOKENS:
        raise ValueError(f"the prompt is {len(ids)} tokens; inspect takes 1 to {MAX_TOKENS}")
    return add_texts(inspect_model(reference_model(path, len(ids)), ids), tok)
