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
    Where the layers are stored and multiplied ("layouts", chosen per layer by `int4_layout`):
      'avx2'  CPUs with AVX2 (AVX-512 or not), groups of 32: llama_min's own kernel (kernels_avx2.c, native.py),
              fp16 scale and min, activations as int16 per group of 32 (error <= 1.5e-5 of the group's
              largest value), float32 out.
      'cpu'   other CPUs, and groups of 64 or 128: `aten._weight_int4pack_mm_for_cpu` on weights repacked by
              `aten._convert_weight_to_int4pack_for_cpu` (in tiles of 32 rows, 64 with AVX-512);
              'cuda': `aten._weight_int4pack_mm`. Both keep scale and zero in bf16, shaped (K/g, N, 2),
              take bf16 activations and return bf16: the product carries bf16 rounding (~2^-8 relative).
      'plain' anywhere else: two codes per byte, dequantized for an F.linear.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from ..errors import LlamaMinError

PREFILL_ROWS = 32  # from this many rows on, a float GEMM on dequantized weights beats the int8 / 'avx2' kernels
INT4_GROUP_SIZES = (32, 64, 128)
CHUNK_WEIGHTS = 1 << 20  # weights converted at a time: the temporaries of a conversion stay at a few MiB
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


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear operator (prompt_linear here, fast.OneDNNLinear)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def chunk_rows(k: int) -> int:
    """Rows per conversion chunk for rows of k weights: ~CHUNK_WEIGHTS weights, a multiple of 256 rows
    (so chunks never split a tile of PyTorch's CPU int4 layout, see cpu_int4_tile_rows)."""
    return max(256, CHUNK_WEIGHTS // k // 256 * 256)


@functools.lru_cache(maxsize=None)
def cpu_int4_tile_rows() -> int:
    """How many rows one tile of PyTorch's CPU int4 layout holds: 32 on AVX2, 64 with AVX-512 (torch 2.13).

    Rows packed in pieces equal the whole matrix packed at once only where the pieces hold whole tiles,
    so the size is found that way (once): the smallest piece size whose packings, put together, are the
    whole one's."""
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    q = torch.randint(0, 16, (256, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    whole = convert(q, 2)
    for rows in (16, 32, 64, 128):
        if torch.equal(torch.cat([convert(q[r : r + rows], 2) for r in range(0, 256, rows)]), whole):
            return rows
    return 256


# ---------------------------------------------------------------------------------------------
# int8, per channel
# ---------------------------------------------------------------------------------------------


def quantize_per_channel(w: torch.Tensor):
    """(N, K) float -> int8 (N, K) and float32 scales (N,), symmetric, one scale per output row."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def _has_int8pack_mm() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A bias-free nn.Linear replacement: int8 weights q (N, K), float32 scales (N,), y = (x q^T) * s."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self._scales_bf16 = scales.to(torch.bfloat16)
        self.native = q.device.type == "cpu" and self.in_features % 32 == 0 and native.enabled()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize_per_channel(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= PREFILL_ROWS:  # a long prompt: compute-bound, so dequantize once and use a float GEMM
            return prompt_linear(x, self.weight.to(x.dtype) * self.scales[:, None].to(x.dtype))
        if self.native and x.device.type == "cpu":  # llama_min's AVX2 kernel (native.py)
            y = native.q8_linear(x.reshape(-1, self.in_features).float(), self.weight, self.scales)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if x.device.type == "cpu" and _has_int8pack_mm():
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if self._scales_bf16.device != x.device:
                self._scales_bf16 = self._scales_bf16.to(x.device)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self._scales_bf16)  # (M, N) bf16
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

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
    q = torch.empty(n, k, dtype=torch.int8, device=device)
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


def int4_layout(device, n: int, k: int, group_size: int) -> str:
    """'avx2', 'cpu' or 'cuda' when that kernel takes this shape, else 'plain' (dequantize + F.linear).

    'avx2' (llama_min/native.py) needs groups of 32 and a CPU where it was built; PyTorch's CPU kernel
    needs N % 16 == 0; the CUDA kernel (inner k tiles of 8) K % 1024 == 0, N % 8 == 0 and a GPU of
    compute capability 8.0 or newer.
    """
    device = torch.device(device)
    if device.type == "cpu" and group_size == 32 and native.enabled():
        return "avx2"
    if device.type == "cpu" and n % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "cpu"
    if (device.type == "cuda" and n % 8 == 0 and k % 1024 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and torch.cuda.get_device_capability(device)[0] >= 8):
        return "cuda"
    return "plain"


def pack_int4(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Codes (N, K) in 0..15 -> the stored form: the CPU/CUDA kernel's tiles, or two codes per byte.

    'plain': byte j of a row holds element 2j in its low nibble and 2j+1 in its high nibble.
    'avx2': per group of 32, byte j holds element j in its low nibble and j+16 in its high one.
    """
    if layout == "avx2":
        q = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 16)  # (N, K/32, low|high, 16)
        return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)
    if layout == "cpu":  # rows pack independently in chunks of whole tiles (cpu_int4_tile_rows)
        chunk = chunk_rows(q.shape[1]) if q.shape[0] % cpu_int4_tile_rows() == 0 else q.shape[0]
        pieces = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[r : r + chunk].to(torch.int32), 2)
                  for r in range(0, q.shape[0], chunk)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if layout == "cuda":  # this kernel's input: uint8 (N, K/2), even element in the high nibble
        q = q.to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4) | q[:, 1::2], 8)
    q = q.to(torch.uint8)
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_plain_int4(packed: torch.Tensor) -> torch.Tensor:
    """(…, K/2) bytes of the 'plain' layout -> (…, K) codes in 0..15 (uint8)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


class Int4Linear(nn.Module):
    """A bias-free nn.Linear replacement with 4-bit weights, a scale and zero per group of g weights.

    weight: the packed codes (layout 'avx2', 'cpu', 'cuda' or 'plain', see `pack_int4`).
    scales_and_zeros: bf16 (K/g, N, 2), weight value = (q - 8) * scale + zero; in the 'avx2' layout
    fp16 (N, 2, K/32) holding each row's scales, then its mins, weight value = q * scale + min (the same
    weights: min = zero - 8 * scale), which is what kernels_avx2.c reads.
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, group_size: int,
                 layout: str):
        super().__init__()
        self.in_features, self.out_features = in_features, scales_and_zeros.shape[0 if layout == "avx2" else 1]
        self.group_size, self.layout = group_size, layout
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        w = linear.weight.detach()
        n, k = w.shape
        step = chunk_rows(k)
        chunks = ((r, *quantize_groupwise_int4(w[r : r + step], group_size)) for r in range(0, n, step))
        return int4_from_rows(n, k, group_size, chunks, w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.layout == "avx2" and x2.shape[0] < PREFILL_ROWS:
            y = native.q4_linear(x2.float(), self.weight, self.scales_and_zeros)
        elif self.layout == "avx2":  # a prompt: one float GEMM on the weights dequantized for it
            y = prompt_linear(x2.float(), self.dequantize())
        elif self.layout == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16), self.weight, self.group_size, self.scales_and_zeros)
        elif self.layout == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.weight, self.group_size,
                                                   self.scales_and_zeros)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weights this layer multiplies by, (N, K) float32.

        'avx2': q * scale + min per group, by kernels_avx2.c (exact: one float32 multiply-add per weight);
        'cpu': the kernel itself, in float32, applied to the identity (exact likewise); 'cuda': the same
        in bf16 (rounded to bf16); 'plain': unpacked directly.
        """
        k, g = self.in_features, self.group_size
        if self.layout == "avx2":
            return native.q4_dequantize(self.weight, self.scales_and_zeros)
        if self.layout == "cpu":
            eye = torch.eye(k, dtype=torch.float32)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, g, self.scales_and_zeros.float()).t()
        if self.layout == "cuda":
            eye = torch.eye(k, dtype=torch.bfloat16, device=self.weight.device)
            return torch.ops.aten._weight_int4pack_mm(eye, self.weight, g, self.scales_and_zeros).t().float()
        q = unpack_plain_int4(self.weight).float().view(self.out_features, k // g, g)
        sz = self.scales_and_zeros.float().transpose(0, 1)  # (N, K/g, 2)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(self.out_features, k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}, "
                f"layout {self.layout}")


def int4_from_rows(n: int, k: int, group_size: int, rows: Iterable, device=None) -> Int4Linear:
    """An Int4Linear filled piecewise: `rows` yields (row0, codes (r, K), scales (r, K/g), zeros (r, K/g)).

    On the CPU each chunk (a multiple of 256 rows, or the rest) is packed straight into the final
    buffer, so the extra memory is one chunk; the CUDA layout is packed once at the end.
    """
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        raise LlamaMinError(f"int4 group size {group_size}: expected one of {INT4_GROUP_SIZES} dividing K = {k}")
    device = torch.device(device or "cpu")
    layout = int4_layout(device, n, k, group_size)
    if layout == "avx2":
        sz = torch.empty(n, 2, k // group_size, dtype=torch.float16, device=device)
    else:
        sz = torch.empty(k // group_size, n, 2, dtype=torch.bfloat16, device=device)
    whole = torch.empty(n, k, dtype=torch.uint8, device=device) if layout == "cuda" else None
    packed = None if whole is not None else torch.empty(n, k // 2, dtype=torch.uint8, device=device)
    for r0, q, scales, zeros in rows:
        r1 = r0 + len(q)
        if layout == "avx2":  # scale and min: Q4_0's -8d and Q4_1's m come back exactly from zero - 8 scale
            sz[r0:r1, 0], sz[r0:r1, 1] = scales, zeros - 8 * scales
        else:
            sz[:, r0:r1, 0], sz[:, r0:r1, 1] = scales.t(), zeros.t()
        if whole is not None:
            whole[r0:r1] = q
        else:
            packed[r0:r1] = pack_int4(q.to(device), layout)
    if whole is not None:
        packed = pack_int4(whole, layout)
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

    All Int8Linear (rows are independent, one scale each), or all Int4Linear with the same group size
    and K, in the 'plain' or 'avx2' layout (rows are independent) or the 'cpu' layout with every N a whole
    number of that kernel's tiles (cpu_int4_tile_rows: 32 or 64 rows), so tiles of different matrices never mix.
    """
    kinds = {type(m) for m in layers}
    if kinds == {Int8Linear}:
        return len({m.in_features for m in layers}) == 1
    if kinds != {Int4Linear}:
        return False
    same = len({(m.in_features, m.group_size, m.layout) for m in layers}) == 1
    layout = layers[0].layout
    rows_apart = layout in ("plain", "avx2")
    whole_tiles = layout == "cpu" and all(m.out_features % cpu_int4_tile_rows() == 0 for m in layers)
    return same and (rows_apart or whole_tiles)


def fuse_quantized(layers) -> nn.Module:
    """[W_1; W_2; ...] as one Int8Linear / Int4Linear, the very same stored values (see can_fuse_quantized)."""
    first = layers[0]
    if isinstance(first, Int8Linear):
        return Int8Linear(torch.cat([m.weight for m in layers]), torch.cat([m.scales for m in layers]))
    packed = torch.cat([m.weight for m in layers])  # (N_1 + N_2 + ..., K/2)
    n_dim = 0 if first.layout == "avx2" else 1  # 'avx2': (N, 2, K/32); else (K/g, N, 2)
    sz = torch.cat([m.scales_and_zeros for m in layers], dim=n_dim)
    return Int4Linear(packed, sz, first.in_features, first.group_size, first.layout)


# ---------------------------------------------------------------------------------------------
# Quantized embedding tables (for GGUF files whose token_embd is quantized): rows looked up, then dequantized
# ---------------------------------------------------------------------------------------------


class Int4Embedding(nn.Module):
    """Embedding rows as 4-bit codes, two per byte ('plain' layout), with bf16 scale/zero per group of g.

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
        q = unpack_plain_int4(self.weight[tokens]).float()  # (..., D)
        q = q.view(*tokens.shape, self.embedding_dim // g, g)
        sz = self.scales_and_zeros[tokens].float()  # (..., D/g, 2)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)


class Int8Embedding(nn.Module):
    """Embedding rows as int8 with one float32 scale per row: row t = q[t] * s[t]."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight[tokens].float() * self.scales[tokens][..., None]
