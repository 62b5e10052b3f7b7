"""Inference transforms that change how the reference model computes, never what (within float rounding).

  FastAttention          model.py's Attention with two shortcuts: one-token decoding attends per KV head
                         without copying the cache n_rep times, and a prompt from position 0 lets the
                         fused kernel build its causal mask itself.
  transpose_wide_layers  float32 CPU weights of wide layers stored transposed (below).

Wide layers stored transposed:

A decode step multiplies one activation row by every weight matrix: y = x W^T, a matrix-vector
product that only streams W from memory. With W stored as PyTorch keeps it, (out, in), the CPU
kernel takes one dot product per short row of `in` numbers; for layers with out >= in (q, o, the
FFN gate/up, the output projection) that runs at about half the machine's bandwidth here
(12 GB/s for SmolLM2's 1536 x 576 and 49152 x 576 matrices, against 18-23 GB/s for the same bytes
stored as W^T, (in, out), and multiplied as x @ W^T). Narrow layers (out < in: the FFN down
projection, small k/v) are faster as they are and stay. The numbers are the same up to float
rounding order (tests/test_fast.py). Measured with scripts/benchmark.py; bf16 and GPUs do not gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import Attention, apply_rotary_emb, repeat_kv


class FastAttention(Attention):
    """Attention, same weights and cache, with shortcuts that give the same numbers (tests/test_fast.py)."""

    @classmethod
    def from_reference(cls, ref: Attention) -> "FastAttention":
        """Take over a reference Attention's projections (shared, not copied)."""
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.n_heads, fast.n_kv_heads, fast.head_dim, fast.n_rep = ref.n_heads, ref.n_kv_heads, ref.head_dim, ref.n_rep
        fast.wq, fast.wk, fast.wv, fast.wo = ref.wq, ref.wk, ref.wv, ref.wo
        fast.cache = ref.cache
        return fast

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, S, K, hd)
        if T == 1:
            out = self._decode_gqa(q, k, v)  # (B, H, hd)
        else:
            k, v = repeat_kv(k, self.n_rep).transpose(1, 2), repeat_kv(v, self.n_rep).transpose(1, 2)
            if start_pos == 0:  # the mask is a plain causal square: the kernel builds it
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
            out = out.transpose(1, 2)  # (B, T, H, hd)
        return self.wo(out.reshape(B, T, -1))

    def _decode_gqa(self, q, k, v):
        """One new token: the n_rep query heads sharing KV head g attend as n_rep "positions" of one head.

        q (B, 1, H, hd) -> (B, K, n_rep, hd) against k, v (B, S, K, hd) -> (B, K, S, hd): the same numbers
        as repeat_kv + per-head attention, without copying the cache. Returns (B, H, hd).
        """
        B = q.shape[0]
        q = q.view(B, self.n_kv_heads, self.n_rep, self.head_dim)
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))  # (B, K, n_rep, hd)
        return out.reshape(B, self.n_heads, self.head_dim)


def use_fast_attention(model) -> nn.Module:
    """Swap every layer's Attention for a FastAttention holding the same projections."""
    for layer in model.layers:
        if type(layer.attention) is Attention:
            layer.attention = FastAttention.from_reference(layer.attention)
    return model


class TransposedLinear(nn.Module):
    """y = x @ W^T with W^T stored contiguous as (in, out). Holds the same numbers as the nn.Linear."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_t", weight.detach().t().contiguous())  # (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(-1, self.in_features) @ self.weight_t  # 2-D: one GEMM, the weight read once
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored transposed"


class TransposedEmbedding(nn.Module):
    """Token lookup from the transposed output matrix of a tied model (no second copy of it)."""

    def __init__(self, output: TransposedLinear):
        super().__init__()
        self.output = [output]  # a plain list: do not register the shared module twice

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weight_t = self.output[0].weight_t  # (D, V): token t's embedding is column t
        rows = weight_t.index_select(1, tokens.flatten()).t().contiguous()  # (B*T, D), a normal layout
        return rows.view(*tokens.shape, -1)  # (B, T, D)


def transpose_wide_layers(model) -> nn.Module:
    """In a Transformer, replace every nn.Linear with out_features >= in_features by a TransposedLinear.

    In a tied model the embedding then reads its rows from the transposed output matrix.
    """
    tied = model.output.weight is model.tok_embeddings.weight
    _swap(model)
    if tied and isinstance(model.output, TransposedLinear):
        model.tok_embeddings = TransposedEmbedding(model.output)
    return model


def _swap(module: nn.Module):
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.out_features >= child.in_features:
            setattr(module, name, TransposedLinear(child.weight))
        else:
            _swap(child)
