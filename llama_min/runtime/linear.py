"""How float32 CPU weights are stored and multiplied: three layouts, and the policy for prompts.

A decode step multiplies one activation row (or a few: a batch, a speculative check) by every weight matrix,
a matrix-vector product that only streams the weights from memory; a prompt multiplies many rows, a
matrix-matrix product limited by arithmetic. PyTorch's default float32 CPU kernel (MKL's, on an (out, in)
weight) is slow at the first kind, so transforms.apply_transforms stores a float32 CPU model's weights in one
of three ways, the first that this machine has:

  NativeLinear      llama_min's AVX2 kernel (native.f32_linear) on the ordinary (out, in) weight.
                    Taken on Linux x86-64 CPUs with AVX2, FMA and F16C where a C compiler is found.
  OneDNNLinear      the weight reordered once into oneDNN's blocked layout.
                    Taken where the AVX2 kernel is off but this torch has oneDNN (onednn_available):
                    x86-64 CPUs without AVX2 or without a C compiler, Windows, Linux on ARM (aarch64
                    wheels are built with oneDNN), and wherever LLAMA_MIN_NATIVE=0.
  TransposedLinear  wide weights (out >= in) stored W^T, (in, out), for MKL's / the BLAS's kernel.
                    Taken where torch has no oneDNN: macOS on Apple silicon (PyTorch's arm64 macOS
                    wheels are built with USE_MKLDNN=OFF) and custom builds without it.

No path is dead: each is the fastest one some supported machine has. Measured on a 2-core AVX-512 machine
(SmolLM2's shape, random weights, 2 threads, greedy decode of 64 tokens, median of 3 interleaved rounds, each
path forced by LLAMA_MIN_NATIVE=0 and by hiding oneDNN): model.py's own classes 15.8 tok/s; NativeLinear with
the C decode step (step.py) 50.4, layer by layer 44.9; OneDNNLinear 28.0 (1.8x the reference);
TransposedLinear 23.5 (1.5x). Every path wrote the reference's greedy tokens.

Prompts (PREFILL_ROWS rows or more) go to a matrix-matrix kernel on a dense weight (prompt_linear), which
NativeLinear and the quantized layers (quantize.py) share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native

PREFILL_ROWS = 32  # from this many rows on, a float GEMM on dense weights beats the few-row kernels
ONEDNN_MAX_K = 1536  # prompt_linear: weight rows of at most this many numbers go to oneDNN, longer to F.linear


def prompt_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T for a prompt's many rows, W (N, K) a dense weight in x's dtype.

    On a CPU, float32, without autograd, with short weight rows (K <= ONEDNN_MAX_K), through oneDNN's matrix
    kernel (it reorders W on each call): on this project's 2-core AVX2 machine it took 18 ms against 29 ms
    for F.linear (MKL) on 512 rows times SmolLM2's 3072 x 576 gate|up matrix, 5.7 against 7.4 ms on its
    960 x 576 q|k|v, about the same on the others (K = 576 and 1536). On TinyLlama's (K = 2048 and 5632)
    MKL was the faster, 512 rows times 2048 x 2048: 25 against 52-60 ms, 11264 x 2048: 150 against 168 ms,
    2048 x 5632: 69 against 76 ms. Elsewhere F.linear.
    """
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and onednn_available()
            and w.shape[1] <= ONEDNN_MAX_K
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, None, "none", [None], "")
        return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


PANEL_WEIGHTS = 1 << 20  # prompt_by_panels: weights dequantized at a time (4 MiB of float32)


def prompt_by_panels(x2: torch.Tensor, n: int, dequantize_rows) -> torch.Tensor:
    """x2 (M, K) float32 times W^T for a quantized W (N, K), a panel of rows at a time: each panel dequantized
    into one reused float32 buffer by `dequantize_rows(start, count, out)` and multiplied by prompt_linear.

    Dequantizing the whole matrix instead would write and read it back at 4 bytes a weight (8x a 4-bit
    matrix) on every prompt, and hold it: the float32 copy of a 1.1B model's 32000 x 2048 output is 250 MiB.
    A panel of PANEL_WEIGHTS weights is still in the cache when the GEMM reads it.
    """
    m, k = x2.shape
    rows = min(n, max(16, PANEL_WEIGHTS // k))
    buf = torch.empty(rows, k, dtype=torch.float32, device=x2.device)
    y = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    for r0 in range(0, n, rows):
        count = min(rows, n - r0)
        y[:, r0 : r0 + count] = prompt_linear(x2, dequantize_rows(r0, count, buf[:count]))
    return y


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear operator (prompt_linear, OneDNNLinear)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# ------------------------------------------------------------------------------------------------
# Wide layers stored transposed (where torch has no oneDNN)
#
# With W stored as PyTorch keeps it, (out, in), the CPU kernel takes one dot product per short row of `in`
# numbers; for layers with out >= in (q, o, the FFN gate/up, the output projection) that ran at about half
# the machine's bandwidth here (12 GB/s for SmolLM2's 1536 x 576 and 49152 x 576 matrices, against 18-23
# GB/s for the same bytes stored as W^T, (in, out), and multiplied as x @ W^T). Narrow layers (out < in:
# the FFN down projection, small k/v) are faster as they are and stay. The numbers are the same up to
# float rounding order (tests/test_fast.py). bf16 and GPUs do not gain.
# ------------------------------------------------------------------------------------------------


class TransposedLinear(nn.Module):
    """y = x @ W^T with W^T stored contiguous as (in, out). Holds the same numbers as the nn.Linear."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_t", weight.detach().t().contiguous())  # (in, out)

    @classmethod
    def from_transposed(cls, weight_t: torch.Tensor) -> "TransposedLinear":
        """Wrap a W^T (in, out) that is already contiguous (no copy)."""
        lin = cls.__new__(cls)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = weight_t.shape
        lin.register_buffer("weight_t", weight_t)
        return lin

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
    swap_float32_linears(model, TransposedLinear, wide_only=True)
    if tied and isinstance(model.output, TransposedLinear):
        model.tok_embeddings = TransposedEmbedding(model.output)
    return model


def linear_holding(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear whose weight is this (out, in) tensor itself (no copy, no random init)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


# ------------------------------------------------------------------------------------------------
# Weights in oneDNN's own blocked layout (where llama_min's AVX2 kernel is off)
#
# For products of a few rows (a speculative verification of k+1 tokens, a batch of 8 decoding rows) the
# default float32 CPU kernel (MKL) runs here about one row at a time: 5 rows cost 4-5x one row. oneDNN,
# given the weight once reordered into its blocked layout, reads the weight once for all the rows: 5 rows
# of SmolLM2's 49152 x 576 output cost 13 ms against 59 ms, one row the same as before, and a 512-token
# prompt 1.3x less (measured on this project's 2-core AVX2 machine). The reordered weight is an opaque
# tensor: it cannot be indexed, so a tied embedding keeps its own dense table, and torch.compile
# cannot trace it, so the compiled step gets dense copies of these layers (compile.CompiledStep, dense_twin):
# a compiled float32 CPU model holds its weights twice, the eager prompts keep oneDNN's speed.
# ------------------------------------------------------------------------------------------------


class OneDNNLinear(nn.Module):
    """y = x W^T for float32 CPU inference, W (out, in) held reordered for oneDNN (`weight_packed`, opaque)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight_packed, None,
                                               "none", [None], "")
        return y.view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """W (out, in) as an ordinary tensor (a copy)."""
        return self.weight_packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN layout"


def use_onednn_linears(model) -> nn.Module:
    """Every float32 CPU nn.Linear in the model -> OneDNNLinear (the dense weight dropped; a tied embedding
    keeps the shared table as its own)."""
    return swap_float32_linears(model, OneDNNLinear)


def swap_float32_linears(module: nn.Module, make, wide_only: bool = False) -> nn.Module:
    """Replace every float32 CPU nn.Linear under `module` (wide_only: those with out >= in) by make(its weight)."""
    for name, child in list(module.named_children()):
        if (type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
                and (not wide_only or child.out_features >= child.in_features)):
            setattr(module, name, make(child.weight))
        else:
            swap_float32_linears(child, make, wide_only)
    return module


def dense_layer(layer: OneDNNLinear) -> nn.Module:
    """The same product on an ordinary weight (a copy): W^T where that layout streams faster (wide layers,
    see "Wide layers stored transposed"), else an nn.Linear."""
    weight = layer.dense_weight()
    return TransposedLinear(weight) if layer.out_features >= layer.in_features else linear_holding(weight)


def dense_twin(module: nn.Module) -> nn.Module:
    """A module tree that shares everything with `module` except its OneDNNLinear layers, which are dense
    copies (dense_layer); `module` itself when it has none."""
    if isinstance(module, OneDNNLinear):
        return dense_layer(module)
    if not any(isinstance(m, OneDNNLinear) for m in module.modules()):
        return module
    twin = module.__class__.__new__(module.__class__)
    twin.__dict__ = dict(module.__dict__)
    twin._modules = {name: dense_twin(child) for name, child in module._modules.items()}
    return twin


# ------------------------------------------------------------------------------------------------
# llama_min's own float32 kernel (native/, kernels_avx2.c)
#
# The weight stays the ordinary (out, in) tensor; one decode row streams it at 20-28 GB/s where MKL and
# oneDNN reach 10-15 on SmolLM2's short rows, and a few rows (a batch, a speculative verification) read it
# once. Prompts of PREFILL_ROWS rows or more go to prompt_linear (oneDNN or F.linear), faster there.
# ------------------------------------------------------------------------------------------------


class NativeLinear(nn.Module):
    """y = x W^T for float32 CPU inference, W (out, in) the nn.Linear's own tensor (shared, not copied)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        if x2.shape[0] >= PREFILL_ROWS:
            return prompt_linear(x, self.weight)
        return native.f32_linear(x2, self.weight).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, llama_min's AVX2 kernel"


def use_native_linears(model) -> nn.Module:
    """Every float32 CPU nn.Linear in the model -> NativeLinear holding the same weight tensor (a tied
    embedding keeps sharing it)."""
    return swap_float32_linears(model, NativeLinear)
