"""How an Int4Linear's 4-bit codes and group scales are stored, and which kernel multiplies by them.

One Int4Layout class per layout; its instance is chosen per layer by `int4_layout` when the layer is built
(quantize.Int4Linear.packing), so what differs between layouts is a method, not a test of a name:

  'avx2'  AVX2Layout: CPUs with AVX2 (AVX-512 or not), groups of 32: llama_min's own kernel (native/,
          kernels_avx2.c), fp16 scale and min, activations as int16 per group of 32 (error <= 1.5e-5 of
          the group's largest value), float32 out.
  'cpu'   CPUTileLayout: other CPUs, and groups of 64 or 128: `aten._weight_int4pack_mm_for_cpu` on
          weights repacked by `aten._convert_weight_to_int4pack_for_cpu` (in tiles of 32 rows, 64 with
          AVX-512); 'cuda' (CUDATileLayout): `aten._weight_int4pack_mm`. Both keep scale and zero in bf16,
          shaped (K/g, N, 2), take bf16 activations and return bf16: the product carries bf16 rounding
          (~2^-8 relative).
  'plain' PlainLayout: anywhere else: two codes per byte, dequantized for an F.linear.

Weight value in every layout: (q - 8) * scale + zero per group (= q * scale + min), as quantize.py derives.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import native
from .linear import PREFILL_ROWS, prompt_by_panels

CHUNK_WEIGHTS = 1 << 20  # weights converted at a time: the temporaries of a conversion stay at a few MiB


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


class Int4Layout:
    """How an Int4Linear stores its codes and group scales, and the kernel that multiplies by them.

    One instance per layout (INT4_LAYOUTS), chosen once per layer when it is built (int4_layout) and held by
    the layer (Int4Linear.packing): what differs between layouts is a method here, not a test of a name.
    This base keeps scale and zero in bf16, shaped (K/g, N, 2): weight value = (q - 8) * scale + zero.
    """

    name = ""
    native = False  # multiplied by llama_min's C code (native.q4_linear; the whole-step decode_layers reads it)
    rows_dim = 1  # the dimension of scales_and_zeros along the N rows (stacking layers concatenates along it)
    packs_in_pieces = True  # rows can be packed a chunk (a multiple of 256 rows) at a time

    def takes(self, device: torch.device, n: int, k: int, group_size: int) -> bool:
        """Whether this layout's kernel takes an (n, k) layer of groups of group_size on `device`."""
        raise NotImplementedError

    def empty_scales(self, n: int, k: int, group_size: int, device) -> torch.Tensor:
        return torch.empty(k // group_size, n, 2, dtype=torch.bfloat16, device=device)

    def put_scales(self, sz: torch.Tensor, r0: int, r1: int, scales: torch.Tensor, zeros: torch.Tensor):
        """Rows r0..r1-1's scales and zeros (r, K/g), float32, into the stored form sz."""
        sz[:, r0:r1, 0], sz[:, r0:r1, 1] = scales.t(), zeros.t()

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """Codes (N, K) in 0..15 -> the stored form."""
        raise NotImplementedError

    def matmul(self, layer, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) -> x2 W^T (M, N), W the weights of `layer` (a quantize.Int4Linear of this layout)."""
        raise NotImplementedError

    def dequantize(self, layer) -> torch.Tensor:
        """The weights the layer multiplies by, (N, K) float32."""
        raise NotImplementedError

    def can_stack(self, layers) -> bool:
        """Whether layers of this layout (same K and group size) stack along N by concatenating their buffers."""
        return True  # rows are stored apart

    def __repr__(self) -> str:
        return f"<int4 layout {self.name}>"


class AVX2Layout(Int4Layout):
    """llama_min's own kernel (kernels_avx2.c): groups of 32, byte j of a group holding element j in its low
    nibble and j+16 in its high one; scales_and_zeros fp16 (N, 2, K/32), each row's scales then its mins,
    weight value = q * scale + min (the same weights: min = zero - 8 * scale)."""

    name, native, rows_dim = "avx2", True, 0

    def takes(self, device, n, k, group_size):
        return device.type == "cpu" and group_size == 32 and native.enabled()

    def empty_scales(self, n, k, group_size, device):
        return torch.empty(n, 2, k // group_size, dtype=torch.float16, device=device)

    def put_scales(self, sz, r0, r1, scales, zeros):
        sz[r0:r1, 0], sz[r0:r1, 1] = scales, zeros - 8 * scales  # Q4_0's -8d and Q4_1's m come back exactly

    def pack(self, q):
        q = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 16)  # (N, K/32, low|high, 16)
        return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)

    def matmul(self, layer, x2):
        if x2.shape[0] >= PREFILL_ROWS:  # a prompt: float GEMMs on the weights dequantized a panel at a time
            codes, dc = layer.weight, layer.scales_and_zeros
            return prompt_by_panels(x2.float(), layer.out_features,
                                    lambda start, count, out: native.q4_dequantize(codes, dc, start, count, out))
        return native.q4_linear(x2.float(), layer.weight, layer.scales_and_zeros)

    def dequantize(self, layer):
        """q * scale + min per group, by kernels_avx2.c (exact: one float32 multiply-add per weight)."""
        return native.q4_dequantize(layer.weight, layer.scales_and_zeros)


class CPUTileLayout(Int4Layout):
    """PyTorch's CPU kernel (`aten._weight_int4pack_mm_for_cpu`) on codes repacked in its tiles of 32 rows (64
    with AVX-512); needs N % 16 == 0. Takes bf16 activations and returns bf16."""

    name = "cpu"

    def takes(self, device, n, k, group_size):
        return device.type == "cpu" and n % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")

    def pack(self, q):
        """In chunks of whole tiles (cpu_int4_tile_rows), which pack independently."""
        chunk = chunk_rows(q.shape[1]) if q.shape[0] % cpu_int4_tile_rows() == 0 else q.shape[0]
        pieces = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[r : r + chunk].to(torch.int32), 2)
                  for r in range(0, q.shape[0], chunk)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def matmul(self, layer, x2):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), layer.weight, layer.group_size,
                                                          layer.scales_and_zeros)

    def dequantize(self, layer):
        """The kernel itself, in float32, applied to the identity (exact)."""
        eye = torch.eye(layer.in_features, dtype=torch.float32)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.weight, layer.group_size,
                                                          layer.scales_and_zeros.float()).t()

    def can_stack(self, layers):
        """Only where every N is a whole number of tiles, so that tiles of different matrices never mix."""
        return all(m.out_features % cpu_int4_tile_rows() == 0 for m in layers)


class CUDATileLayout(Int4Layout):
    """PyTorch's CUDA kernel (`aten._weight_int4pack_mm`, inner k tiles of 8): K % 1024 == 0, N % 8 == 0, a GPU
    of compute capability 8.0 or newer. Packed once, the whole matrix; bf16 activations and output."""

    name, packs_in_pieces = "cuda", False

    def takes(self, device, n, k, group_size):
        return (device.type == "cuda" and n % 8 == 0 and k % 1024 == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm") and torch.cuda.get_device_capability(device)[0] >= 8)

    def pack(self, q):
        q = q.to(torch.uint8)  # this kernel's input: uint8 (N, K/2), even element in the high nibble
        return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4) | q[:, 1::2], 8)

    def matmul(self, layer, x2):
        return torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), layer.weight, layer.group_size,
                                                  layer.scales_and_zeros)

    def dequantize(self, layer):
        """The kernel applied to the identity, in bf16 (rounded to bf16)."""
        eye = torch.eye(layer.in_features, dtype=torch.bfloat16, device=layer.weight.device)
        w_t = torch.ops.aten._weight_int4pack_mm(eye, layer.weight, layer.group_size, layer.scales_and_zeros)
        return w_t.t().float()

    def can_stack(self, layers):
        return False  # the tiles interleave rows


class PlainLayout(Int4Layout):
    """Anywhere else: two codes per byte (byte j of a row holds element 2j in its low nibble and 2j+1 in its
    high one), dequantized for an F.linear. Int4Embedding stores its rows this way too."""

    name = "plain"

    def takes(self, device, n, k, group_size):
        return True

    def pack(self, q):
        q = q.to(torch.uint8)
        return q[:, ::2] | (q[:, 1::2] << 4)

    @staticmethod
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        """(…, K/2) bytes -> (…, K) codes in 0..15 (uint8)."""
        return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)

    def matmul(self, layer, x2):
        return F.linear(x2, self.dequantize(layer).to(x2.dtype))

    def dequantize(self, layer):
        n, k, g = layer.out_features, layer.in_features, layer.group_size
        q = self.unpack(layer.weight).float().view(n, k // g, g)
        sz = layer.scales_and_zeros.float().transpose(0, 1)  # (N, K/g, 2)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(n, k)


INT4_LAYOUTS = (AVX2Layout(), CPUTileLayout(), CUDATileLayout(), PlainLayout())  # in order of preference
PLAIN_INT4 = INT4_LAYOUTS[-1]


def int4_layout(device, n: int, k: int, group_size: int) -> Int4Layout:
    """The first of INT4_LAYOUTS whose kernel takes this shape on `device` ('plain' takes any)."""
    device = torch.device(device)
    return next(layout for layout in INT4_LAYOUTS if layout.takes(device, n, k, group_size))
