"""FastAttention: model.py's Attention, same weights and cache, with shortcuts that give the same numbers.

  - one new token (decoding) attends per KV head: the n_rep query heads that share a KV head act as n_rep
    "positions" of one head, so the cache is never copied n_rep times (repeat_kv);
  - longer inputs let PyTorch's attention read the KV heads directly (enable_gqa, PyTorch >= 2.5);
  - a prompt from position 0 lets the fused kernel build its causal mask itself;
  - where llama_min's kernels build, one-token steps may run RoPE, the cache write and the attention in one
    call (`native_decode`, switched on by native_decode.use_native_decode).

Tested against the reference in tests/test_fast.py (logits within 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from ..model import Attention, apply_rotary_emb, repeat_kv


# PyTorch >= 2.5's attention takes fewer key/value heads than query heads itself (enable_gqa), with
# query head h reading KV head h // n_rep: what repeat_kv builds, without copying the keys and values.
SDPA_GQA = tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 5)


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

    def project(self, x: torch.Tensor):
        """x (B, T, D) -> q (B, T, H, hd), k and v (B, T, K, hd), before RoPE."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v

    native_decode = False  # set by use_native_decode: one-token steps in one call of llama_min's kernel

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if T == 1 and self.native_decode and self.cache is not None:  # RoPE, cache write, attention: one call
            out = native.decode_attention(q, k, v, freqs_cis, start_pos, self.cache.k, self.cache.v)  # (B, H*hd)
            return self.wo(out.view(B, 1, -1))
        q, k = apply_rotary_emb(q, k, freqs_cis)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, S, K, hd)
        out = self._decode_gqa(q, k, v) if T == 1 else self._attend(q, k, v, start_pos, mask)
        return self.wo(out.reshape(B, T, -1))

    def _attend(self, q, k, v, start_pos: int, mask):
        """Several new tokens: q (B, T, H, hd) against k, v (B, S, K, hd) -> (B, T, H, hd)."""
        gqa = {"enable_gqa": True} if SDPA_GQA and self.n_rep > 1 else {}  # query head h reads KV head h // n_rep
        if not gqa:
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # (B, S, H, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, hd)
        if start_pos == 0:  # the mask is a plain causal square: the kernel builds it
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return out.transpose(1, 2)  # (B, T, H, hd)

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
