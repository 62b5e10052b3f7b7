"""int8 weight-only quantization: a quarter of float32's bytes per token, so faster memory-bound decoding.

Each output row (channel) n of a weight W (N, K) gets one scale s_n = max_k |W[n, k]| / 127 and
int8 values q[n, k] = round(W[n, k] / s_n); then  y = x W^T ~= (x q^T) * s.  Activations stay in
floating point. On the CPU the product runs in PyTorch's int8 x bf16 kernel
(`aten._weight_int8pack_mm`), which streams the int8 weights directly; elsewhere, and for prompts
of many tokens (where the work is arithmetic, not memory), the weights are dequantized on the fly. Embeddings and norms are not quantized (one row / a few numbers per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


PREFILL_ROWS = 32  # from this many rows on, a float GEMM on dequantized weights beats the int8 kernel


def quantize_per_channel(w: torch.Tensor):
    """(N, K) float -> int8 (N, K) and float32 scales (N,), symmetric, one scale per output row."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def _has_int8pack_mm() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A bias-free nn.Linear replacement holding int8 weights and per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_per_channel(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self._scales_bf16 = scales.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= PREFILL_ROWS:  # a long prompt: compute-bound, so dequantize once and use a float GEMM
            return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None].to(x.dtype))
        if x.device.type == "cpu" and _has_int8pack_mm():
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if self._scales_bf16.device != x.device:
                self._scales_bf16 = self._scales_bf16.to(x.device)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self._scales_bf16)  # (M, N) bf16
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in the model (attention, FFN, output) by an Int8Linear, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model
