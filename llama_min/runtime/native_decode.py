"""The small operations between a decode step's matrix products through llama_min's kernels (native/).

model.py's RMSNorm is eight small PyTorch operations, and RoPE + cache write + attention another dozen, each
costing microseconds of dispatch for a few hundred numbers of work. Where the kernels build and the
activations are float32 on a CPU, `use_native_decode` routes them to one kernel call each: rms_norm
(NativeRMSNorm), decode_attention (a FastAttention's one-token steps) and swiglu (a FusedFeedForward's
silu(gate) * up). Tested against the reference in tests/test_fast.py (logits within 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn

from . import native
from ..model import RMSNorm


class NativeRMSNorm(RMSNorm):
    """model.py's RMSNorm, float32 CPU activations normalised in one call of llama_min's kernel."""

    @classmethod
    def from_reference(cls, ref: RMSNorm) -> "NativeRMSNorm":
        norm = cls.__new__(cls)
        nn.Module.__init__(norm)
        norm.eps, norm.weight = ref.eps, ref.weight  # the same Parameter
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not native_activations(x):
            return super().forward(x)  # (a compiled graph fuses the reference's operations itself)
        return native.rms_norm(x, self.weight, self.eps)


def native_activations(x: torch.Tensor) -> bool:
    """Whether x can go through llama_min's eager kernels: float32 on a CPU, outside a compiled graph and
    outside autograd (they have no backward)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and x.requires_grad))


def use_native_decode(model) -> nn.Module:
    """Every RMSNorm -> NativeRMSNorm, and the switches on that the layers declare: `native_decode` of an
    attention (attention.FastAttention: one-token RoPE, cache write and attention in one decode_attention
    call), `native_swiglu` of a feed-forward (fusion.FusedFeedForward: silu(gate) * up in one swiglu call).
    For models whose activations are float32 on a CPU where the kernels build."""
    for layer in model.layers:
        layer.attention_norm = NativeRMSNorm.from_reference(layer.attention_norm)
        layer.ffn_norm = NativeRMSNorm.from_reference(layer.ffn_norm)
        if hasattr(type(layer.attention), "native_decode"):
            layer.attention.native_decode = True
        if hasattr(type(layer.feed_forward), "native_swiglu"):
            layer.feed_forward.native_swiglu = True
    model.norm = NativeRMSNorm.from_reference(model.norm)
    return model
