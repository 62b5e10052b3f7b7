"""Inference-only weight layout for float32 decoding on the CPU: wide layers stored transposed.

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
from torch import nn


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
