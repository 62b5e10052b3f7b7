"""Weight-only quantization: int8 per channel and int4 per group. Fewer bytes per token, faster decoding.

Decoding one token reads every weight once, so on a CPU its speed is memory bandwidth / bytes per
token: int8 reads a quarter of float32's bytes, int4 (plus its scales) about a sixth. Activations
stay in floating point; only the stored weights change. Embeddings and norms stay float (one row /
a few numbers per token) unless a quantized GGUF file brings them quantized (see `Int4Embedding`).

int8, per output channel (row) n of W (N, K):
    s_n = max_k |W[n, k]| / 127,   q[n, k] = round(W[n, k] / s_n) in -127..127,   W ~= q * s
    error |W - q s| <= s_n / 2 = max_k |W[n, k]| / 254.
    CPU product: PyTorch's int8 x bf16 kernel `aten._weight_int8pack_mm`.

int4, per group of g = 32, 64 or 128 consecutive weights of a row (gpt-fast's asymmetric scheme):
    scale = (max - min) / 15,   zero = min + 8 * scale,   q = round((w - min) / scale) in 0..15
    W ~= (q - 8) * scale + zero    (= q * scale + min)
    error <= scale / 2 per weight (plus the bf16 rounding of scale and zero, relative 2^-8).
    Where the layers are stored and multiplied: one Int4Layout class per layout (int4_layouts.py), its instance
    chosen per layer by `int4_layout` when the layer is built and held by it (Int4Linear.packing; .layout
    is its name): 'avx2' (llama_min's own kernel), 'cpu' and 'cuda' (PyTorch's), 'plain' (anywhere else).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import hugepages, native
from ..errors import LlamaMinError
from .int4_layouts import PLAIN_INT4, Int4Layout, chunk_rows, int4_layout
from .linear import PREFILL_ROWS, prompt_by_panels, prompt_linear

INT4_GROUP_SIZES = (32, 64, 128)


# ---------------------------------------------------------------------------------------------
# int8, per channel
# ---------------------------------------------------------------------------------------------


def quantize_per_channel(w: torch.Tensor):
    """(N, K) float -> int8 (N, K) and float32 scales (N,), symmetric, one scale per output row."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def hold_int8_rows(module: nn.Module, q: torch.Tensor, scales: torch.Tensor) -> None:
    """Register int8 rows q (N, K) and their float32 scales (N,) as the buffers `weight` and `scales`
    (state-dict names of Int8Linear and Int8Embedding alike)."""
    module.register_buffer("weight", q)
    module.register_buffer("scales", scales)


def _has_int8pack_mm() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A bias-free nn.Linear replacement: int8 weights q (N, K), float32 scales (N,), y = (x q^T) * s."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        hold_int8_rows(self, q, scales)
        self._scales_bf16 = scales.to(torch.bfloat16)
        self.native = q.device.type == "cpu" and self.in_features % 32 == 0 and native.enabled()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize_per_channel(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= PREFILL_ROWS and x.dtype == torch.float32:  # a long prompt: float GEMMs, a panel at a time
            y = prompt_by_panels(x.reshape(-1, self.in_features), self.out_features, self._float_rows)
            return y.reshape(*x.shape[:-1], self.out_features)
        if rows >= PREFILL_ROWS:
            return prompt_linear(x, self.weight.to(x.dtype) * self.scales[:, None].to(x.dtype))
        if self.native and x.device.type == "cpu":  # llama_min's AVX2 kernel (native/)
            y = native.q8_linear(x.reshape(-1, self.in_features).float(), self.weight, self.scales)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if x.device.type == "cpu" and _has_int8pack_mm():
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if self._scales_bf16.device != x.device:
                self._scales_bf16 = self._scales_bf16.to(x.device)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self._scales_bf16)  # (M, N) bf16
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def _float_rows(self, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start .. start+count-1 of the weights as float32, written into `out` (prompt_by_panels)."""
        rows = slice(start, start + count)
        return torch.mul(self.weight[rows], self.scales[rows, None], out=out)

    def dequantize(self) -> torch.Tensor:
        """The weights this layer multiplies by, (N, K) float32."""
        return self.weight.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def int8_from_rows(n: int, k: int, rows: Iterable, device=None) -> Int8Linear:
    """An Int8Linear filled piecewise: `rows` yields (row0, float chunk (r, K)) covering rows 0..n-1.

    Per-channel scales depend only on their own row, so quantizing in row chunks is exact; the
    largest float copy alive is one chunk.
    """
    q = hugepages.empty((n, k), torch.int8, device)  # filled in place: never copied onto huge pages later
    scales = torch.empty(n, dtype=torch.float32, device=device)
    for r0, w in rows:
        q[r0 : r0 + len(w)], scales[r0 : r0 + len(w)] = quantize_per_channel(w.to(device))
    return Int8Linear(q, scales)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in the model (attention, FFN, output) by an Int8Linear, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child)
    return model


# ---------------------------------------------------------------------------------------------
# int4, per group
# ---------------------------------------------------------------------------------------------


def quantize_groupwise_int4(w: torch.Tensor, group_size: int):
    """(N, K) float -> codes uint8 (N, K) in 0..15, scales and zeros float32 (N, K/g); w ~= (q-8)*scale + zero."""
    n, k = w.shape
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6)  # a constant group gets any positive scale: q = 0 then
    zeros = lo + 8 * scales
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scales, zeros


class Int4Linear(nn.Module):
    """A bias-free nn.Linear replacement with 4-bit weights, a scale and zero per group of g weights.

    weight: the packed codes, scales_and_zeros: the group scales, both in the stored form of `packing` (an
    Int4Layout, see its classes), which also multiplies by them. `layout` is its name ('avx2', 'cpu', 'cuda'
    or 'plain'); `native` whether llama_min's C code multiplies by this layer.
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, group_size: int,
                 packing: Int4Layout):
        super().__init__()
        self.in_features, self.out_features = in_features, scales_and_zeros.shape[packing.rows_dim]
        self.group_size, self.packing = group_size, packing
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @property
    def layout(self) -> str:
        return self.packing.name

    @property
    def native(self) -> bool:
        return self.packing.native

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        w = linear.weight.detach()
        n, k = w.shape
        step = chunk_rows(k)
        chunks = ((r, *quantize_groupwise_int4(w[r : r + step], group_size)) for r in range(0, n, step))
        return int4_from_rows(n, k, group_size, chunks, w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packing.matmul(self, x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weights this layer multiplies by, (N, K) float32 (see the layout's dequantize)."""
        return self.packing.dequantize(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}, "
                f"layout {self.layout}")


def int4_from_rows(n: int, k: int, group_size: int, rows: Iterable, device=None) -> Int4Linear:
    """An Int4Linear filled piecewise: `rows` yields (row0, codes (r, K), scales (r, K/g), zeros (r, K/g)).

    Where the layout packs in pieces (the CPU ones) each chunk (a multiple of 256 rows, or the rest) is packed
    straight into the final buffer, so the extra memory is one chunk; the CUDA layout is packed once at the end.
    """
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        raise LlamaMinError(f"int4 group size {group_size}: expected one of {INT4_GROUP_SIZES} dividing K = {k}")
    device = torch.device(device or "cpu")
    layout = int4_layout(device, n, k, group_size)
    sz = layout.empty_scales(n, k, group_size, device)
    codes = None if layout.packs_in_pieces else torch.empty(n, k, dtype=torch.uint8, device=device)
    packed = None if codes is not None else hugepages.empty((n, k // 2), torch.uint8, device)
    for r0, q, scales, zeros in rows:
        r1 = r0 + len(q)
        layout.put_scales(sz, r0, r1, scales, zeros)
        if codes is not None:
            codes[r0:r1] = q
        else:
            packed[r0:r1] = layout.pack(q.to(device))
    if codes is not None:
        packed = layout.pack(codes)
    return Int4Linear(packed, sz, k, group_size, layout)


def quantize_int4(model: nn.Module, group_size: int = 32) -> nn.Module:
    """Replace every nn.Linear whose in_features is a multiple of group_size by an Int4Linear, in place;
    a Transformer's output projection gets int8 instead.

    The output projection decides every token directly, and 4-bit rounding of it costs the most: on SmolLM2
    an int4 copy with an int4 output agreed with float32's greedy choice on 72% of the tokens of a run
    and one with an int8 output on more (measured as a speculative draft's acceptance). llama.cpp's 4-bit
    files keep theirs at 6 or 8 bits for the same reason, as the default model's Q4_1 file does (Q8_0).
    """
    if group_size not in INT4_GROUP_SIZES:
        raise LlamaMinError(f"int4 group size {group_size}: expected one of {INT4_GROUP_SIZES}")
    output = getattr(model, "output", None)
    if isinstance(output, nn.Linear) and hasattr(model, "layers"):
        model.output = Int8Linear.from_linear(output)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.in_features % group_size == 0:
            setattr(model, name, Int4Linear.from_linear(child, group_size))
        elif not isinstance(child, nn.Linear):
            quantize_int4(child, group_size)
    return model


def parse_quantize(spec: Optional[str]):
    """'int8' -> ('int8', None); 'int4' -> ('int4', 32); 'int4-64' / 'int4:128' -> ('int4', 64 / 128)."""
    if spec is None:
        return None, None
    kind, _, group = str(spec).replace(":", "-").partition("-")
    if kind == "int8" and not group:
        return "int8", None
    if kind == "int4" and (not group or (group.isdigit() and int(group) in INT4_GROUP_SIZES)):
        return "int4", int(group or 32)
    raise LlamaMinError(f"unknown quantization '{spec}' (expected int8, int4, int4-64 or int4-128)")


def quantize_model(model: nn.Module, spec: str) -> nn.Module:
    """Apply `--quantize SPEC` (see parse_quantize) to a float model, in place."""
    kind, group = parse_quantize(spec)
    return quantize_int8(model) if kind == "int8" else quantize_int4(model, group)


# ---------------------------------------------------------------------------------------------
# Fusing quantized layers that read the same input (q/k/v, the FFN's gate/up): one kernel call
# ---------------------------------------------------------------------------------------------


def can_fuse_quantized(layers) -> bool:
    """Whether these layers can be stacked along N by concatenating their stored buffers.

    All Int8Linear (rows are independent, one scale each), or all Int4Linear with the same group size, K and
    layout, where that layout stacks them (Int4Layout.can_stack: rows stored apart, or whole tiles).
    """
    kinds = {type(m) for m in layers}
    if kinds == {Int8Linear}:
        return len({m.in_features for m in layers}) == 1
    if kinds != {Int4Linear}:
        return False
    same = len({(m.in_features, m.group_size, m.layout) for m in layers}) == 1
    return same and layers[0].packing.can_stack(layers)


def fuse_quantized(layers) -> nn.Module:
    """[W_1; W_2; ...] as one Int8Linear / Int4Linear, the very same stored values (see can_fuse_quantized)."""
    first = layers[0]
    if isinstance(first, Int8Linear):
        return Int8Linear(torch.cat([m.weight for m in layers]), torch.cat([m.scales for m in layers]))
    packed = torch.cat([m.weight for m in layers])  # (N_1 + N_2 + ..., K/2)
    sz = torch.cat([m.scales_and_zeros for m in layers], dim=first.packing.rows_dim)
    return Int4Linear(packed, sz, first.in_features, first.group_size, first.packing)


# ---------------------------------------------------------------------------------------------
# Quantized embedding tables (for GGUF files whose token_embd is quantized): rows looked up, then dequantized
# ---------------------------------------------------------------------------------------------


class Int4Embedding(nn.Module):
    """Embedding rows as 4-bit codes, two per byte (PlainLayout), with bf16 scale/zero per group of g.

    Row t of the table = (q[t] - 8) * scale[t] + zero[t] per group: the same values an Int4Linear built
    from the same codes multiplies by. Lookup unpacks only the rows asked for.
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.shape[0], packed.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("weight", packed)  # (V, D/2) uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (V, D/g, 2) bf16

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        q = PLAIN_INT4.unpack(self.weight[tokens]).float()  # (..., D)
        q = q.view(*tokens.shape, self.embedding_dim // g, g)
        sz = self.scales_and_zeros[tokens].float()  # (..., D/g, 2)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)


class Int4RowsEmbedding(nn.Module):
    """Embedding rows in the 'avx2' 4-bit layout (int4_layouts.AVX2Layout: codes (V, D/2) uint8, fp16 scales
    then mins (V, 2, D/32)), as a Q4_K token_embd converts to: a lookup gathers the rows asked for and
    dequantizes only them (native.q4_dequantize): row t = q * scale + min per group of 32."""

    def __init__(self, codes: torch.Tensor, dc: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape[0], codes.shape[1] * 2
        self.register_buffer("weight", codes)
        self.register_buffer("scales_and_zeros", dc)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        rows = native.q4_dequantize(self.weight[flat], self.scales_and_zeros[flat])  # (T, D)
        return rows.view(*tokens.shape, self.embedding_dim)


class Int8Embedding(nn.Module):
    """Embedding rows as int8 with one float32 scale per row: row t = q[t] * s[t]."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        hold_int8_rows(self, q, scales)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight[tokens].float() * self.scales[tokens][..., None]
