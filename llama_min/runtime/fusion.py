"""Fused projections: q, k and v from one matrix product, the FFN's gate and up from another.

y = x [W_1; W_2; ...]^T = [x W_1^T, x W_2^T, ...]: the bytes read are the same, but a small model's decode
step is dominated by per-operation overhead (SmolLM2: 30 thin layers), and this removes three of its seven
matrix products per layer. The stacked weights are built once at load and replace the originals (never held
twice). Quantized layers stack the same way, their stored codes and scales concatenated
(quantize.fuse_quantized). Tested against the reference in tests/test_fast.py (logits within 1e-4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from ..model import Attention, FeedForward
from .attention import FastAttention
from .linear import TransposedLinear, linear_holding
from .native_decode import native_activations
from .memory import return_freed_memory
from .quantize import can_fuse_quantized, fuse_quantized


def fuse_linears(linears, transposed: bool) -> nn.Module:
    """Stack bias-free nn.Linear weights W_1 (n_1, D), W_2 (n_2, D), ... into one layer D -> n_1 + n_2 + ...

    y = x [W_1; W_2; ...]^T = [x W_1^T, x W_2^T, ...]: one pass over the weights instead of several.
    transposed=True stores a wide stack as W^T (D, n_1 + n_2 + ...) directly (a TransposedLinear). Either way
    one concatenation builds it, and the caller drops the originals: the weights are never held twice.
    """
    if not all(type(m) is nn.Linear for m in linears):  # quantized layers: their buffers stacked along N
        return fuse_quantized(linears)
    weights = [lin.weight.detach() for lin in linears]
    if transposed and sum(w.shape[0] for w in weights) >= weights[0].shape[1]:  # wide: W^T pays (linear.py)
        return TransposedLinear.from_transposed(torch.cat([w.t() for w in weights], dim=1))
    return linear_holding(torch.cat(weights, dim=0))  # (n_1 + n_2 + ..., D)


class FusedAttention(FastAttention):
    """FastAttention whose q, k, v come from one product: wqkv = [Wq; Wk; Wv], (H*hd + 2*K*hd) x D."""

    @classmethod
    def from_reference(cls, ref: Attention, transposed: bool = False) -> "FusedAttention":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in ("n_heads", "n_kv_heads", "head_dim", "n_rep"):
            setattr(fused, name, getattr(ref, name))
        fused.wqkv = fuse_linears([ref.wq, ref.wk, ref.wv], transposed)
        fused.wo, fused.cache = ref.wo, ref.cache
        return fused

    def project(self, x: torch.Tensor):
        B, T, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * hd, K * hd, K * hd], dim=-1)  # views of one (B, T, (H+2K)*hd)
        return q.view(B, T, H, hd), k.view(B, T, K, hd), v.view(B, T, K, hd)


class FusedFeedForward(nn.Module):
    """SwiGLU with gate and up from one product: w13 = [W1; W3], 2F x D; then w2( silu(gate) * up )."""

    def __init__(self, ref: FeedForward, transposed: bool = False):
        super().__init__()
        self.hidden = ref.w1.out_features
        self.w13 = fuse_linears([ref.w1, ref.w3], transposed)
        self.w2 = ref.w2

    native_swiglu = False  # set by use_native_decode: silu(gate) * up in one call of llama_min's kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)  # (B, T, 2F)
        if self.native_swiglu and native_activations(gate_up):
            return self.w2(native.swiglu(gate_up, self.hidden))  # (B, T, F) -> (B, T, D)
        gate, up = gate_up.split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


def fuse_projections(model, transposed: bool = False) -> nn.Module:
    """In every block, Attention -> FusedAttention and FeedForward -> FusedFeedForward, where the projections
    are plain nn.Linear or quantized layers that stack (int8, or int4 of one group size). transposed: store
    the fused float weights W^T (float32 CPU decoding where torch has no oneDNN, linear.py); both fused
    layers are wide."""
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        if type(att) in (Attention, FastAttention) and _stackable(att.wq, att.wk, att.wv):
            layer.attention = FusedAttention.from_reference(att, transposed)
        if type(ffn) is FeedForward and _stackable(ffn.w1, ffn.w3):
            layer.feed_forward = FusedFeedForward(ffn, transposed)
        del att, ffn
        return_freed_memory()  # this layer's unstacked originals: else resident memory keeps them all
    return model


def _stackable(*modules) -> bool:
    """Float nn.Linear layers, or quantized ones that stack (quantize.can_fuse_quantized)."""
    return all(type(m) is nn.Linear for m in modules) or can_fuse_quantized(modules)
