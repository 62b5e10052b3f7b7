"""Matrices held as a GGUF file's own blocks, read where the file is memory-mapped: nothing repacked, nothing copied.

A quantized GGUF file stores each row of a weight matrix as blocks of 32 weights (formats in
native/kernels_avx2.c): Q4_0 (18 bytes: fp16 d, 16 bytes of 4-bit codes; w = d (q - 8)), Q4_1 (20 bytes:
d, m, codes; w = d q + m), Q8_0 (34 bytes: d, 32 int8; w = d q). llama_min's C kernels multiply by those
blocks directly, so a model built from such a file holds views of the mapped file, not a copy:

  - loading costs no time per weight (the 1.1B-shape Q4_0 file: Llama.build took 4.7 s with the repack this
    replaced, 0.34 s mapped, one run each while another build ran beside them);
  - resident memory for weights is the file's size (the pages the products touch, shared with the OS's
    page cache), not the ~1.11x of a repacked copy; a tied output layer reads the embedding's own blocks;
  - the weights are the file's, bit for bit: no fp16 or bf16 rounding of scales, no int8 requantization of
    Q8_0 (the earlier path requantized its rows per channel).

How each call multiplies (BlockLinear.forward):
  fewer than PREFILL_ROWS rows (decoding)  native.block_linear: int16 activations per block of 32 times the
                                           stored codes, exact integer sums (kernels_avx2.c); the whole-step
                                           C decode (step.py) reads the same blocks
  a prompt                                 float32 GEMMs on the weights dequantized a panel of rows at a time
                                           (linear.prompt_by_panels): exact weights, float rounding only

Used where llama_min's kernels run (native.enabled(): x86-64 Linux with AVX2, FMA, F16C and a C compiler);
elsewhere runtime/packed.py repacks these types for PyTorch's kernels as before.

TiledLinear: on CPUs with AVX-512 VNNI (native.vnni()) Q4_0 / Q4_1 / Q8_0 matrices are instead regrouped once
at load into tiles of 8 rows (native.q4x8_repack, q8x8_repack: the same bytes, so the same size and the file's
weights bit for bit; the file's pages are released as it goes) that one kernel multiplies for decoding and
prompts alike: activations as two int8 digits per block of 32 (x ~ s2 (254 x1 + x2): error <= max|x_block| /
64516, as the int16 activations of the other kernels), each vpdpbusd instruction adding 4 code x digit products
into each of 8 rows' sums, and the eight lanes of a register being eight rows, no horizontal sums. Measured on
the 2-core EPYC, 512-row products of a 5632 x 2048 matrix: Q4_0 140-153 GMAC/s, Q8_0 167 against 94 through
float panels. One digit (int8 activations, as llama.cpp's quantized products) is about twice as fast again, but
it changed the default model's answers: emulated per layer, rounding the prompt's activations to int8 in the
FFN's gate and up projections alone moved SmolLM2 off "The capital of France is Paris." (perplexity moved by
0.005%: the quick start's question sits on a near-tie). A Q8_0 model so tiled scores its dequantized weights'
perplexity (51.1681 against 51.1682 on the default model written as Q8_0).
"""

from __future__ import annotations

import torch
from torch import nn

from . import native
from .linear import PREFILL_ROWS, prompt_by_panels

BLOCK_TYPES = tuple(native.BLOCK_TYPES)  # "Q4_0", "Q4_1", "Q8_0"
TILED_TYPES = tuple(native.TILED_TYPES)  # "Q4_0", "Q4_1", "Q8_0", "Q4_K": tiled at load where the CPU has AVX-512 VNNI


class BlockLinear(nn.Module):
    """A bias-free nn.Linear replacement whose weight W (N, K) is rows of ggml blocks of `ggml_type`.

    blocks: (N, K/32 * block bytes) uint8, usually a view of the memory-mapped file (read-only in spirit:
    the mapping is copy-on-write, so a write would only change this process's copy).
    """

    def __init__(self, blocks: torch.Tensor, ggml_type: str, in_features: int):
        super().__init__()
        if ggml_type not in native.BLOCK_TYPES:
            raise ValueError(f"BlockLinear: type {ggml_type} is not one of {BLOCK_TYPES}")
        self.ggml_type, self.in_features, self.out_features = ggml_type, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks)
        native.check_blocks(blocks, ggml_type, in_features)  # checked once here (and on every call)

    @property
    def kind(self) -> int:
        """The matrix kind kernels_avx2.c numbers this type with."""
        return native.BLOCK_TYPES[self.ggml_type][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] < PREFILL_ROWS:
            y = native.block_linear(x2, self.blocks, self.ggml_type)
        else:
            y = prompt_by_panels(x2, self.out_features, self._float_rows)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _float_rows(self, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        return native.block_dequantize(self.blocks, self.ggml_type, self.in_features, start=start, count=count,
                                       out=out)

    def dequantize(self) -> torch.Tensor:
        """The weights this layer multiplies by, (N, K) float32: the file's values exactly."""
        return native.block_dequantize(self.blocks, self.ggml_type, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.ggml_type} blocks as stored")


class BlockEmbedding(nn.Module):
    """The token embedding table as rows of ggml blocks: a lookup dequantizes only the rows asked for."""

    def __init__(self, blocks: torch.Tensor, ggml_type: str, embedding_dim: int):
        super().__init__()
        if ggml_type not in native.BLOCK_TYPES:
            raise ValueError(f"BlockEmbedding: type {ggml_type} is not one of {BLOCK_TYPES}")
        self.ggml_type, self.num_embeddings, self.embedding_dim = ggml_type, blocks.shape[0], embedding_dim
        self.register_buffer("blocks", blocks)
        native.check_blocks(blocks, ggml_type, embedding_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = native.block_dequantize(self.blocks, self.ggml_type, self.embedding_dim, rows=tokens)
        return rows.view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.ggml_type} blocks as stored"


class TiledLinear(nn.Module):
    """x W^T for a Q4_0 / Q4_1 / Q8_0 / Q4_K matrix W (N, K) in the tiled layout (native.tile_blocks; see
    the module docstring): tiles (tiled_bytes,) uint8. Every call, decoding or a prompt, goes to
    native.tiled_linear."""

    def __init__(self, tiles: torch.Tensor, ggml_type: str, in_features: int, out_features: int):
        super().__init__()
        native.check_tiles(tiles, ggml_type, out_features, in_features)
        self.ggml_type, self.in_features, self.out_features = ggml_type, in_features, out_features
        self.register_buffer("tiles", tiles)

    @property
    def kind(self) -> int:
        return native.TILED_TYPES[self.ggml_type][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native.tiled_linear(x.reshape(-1, self.in_features).float(), self.tiles, self.ggml_type,
                                self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weights, (N, K) float32, read back from the tiles: d (q - 8), d q + m or d q per block; Q4_K:
        d sc q - dmin mn per sub-block of 32."""
        n, k = self.out_features, self.in_features
        if self.ggml_type == "Q4_K":
            return self._dequantize_q4_k()
        if self.ggml_type == "Q6_K":
            return self._dequantize_q6_k()
        t = self.tiles.view(-1, k // 32, native.TILED_TYPES[self.ggml_type][1])  # (tiles, blocks, tile bytes)
        d = t[..., :16].contiguous().view(torch.float16).float().permute(0, 2, 1)[..., None]  # (tiles, 8, blocks, 1)
        if self.ggml_type == "Q8_0":  # P_k: (k, row, 4 bytes), each code plus 128
            codes = (t[..., 16:].reshape(*t.shape[:2], 8, 8, 4) ^ 0x80).view(torch.int8).float()
            q = codes.permute(0, 3, 1, 2, 4).reshape(*d.shape[:3], 32)  # (tiles, row, block, weight)
            return (d * q).reshape(-1, k)[:n]
        has_min = self.ggml_type == "Q4_1"
        codes = t[..., (32 if has_min else 16):].reshape(*t.shape[:2], 4, 8, 4)  # (.., k, row, byte)
        q = torch.cat([codes & 15, codes >> 4], dim=2).float()  # (.., 8 [lo k | hi k], row, byte)
        q = q.permute(0, 3, 1, 2, 4).reshape(*d.shape[:3], 32)  # (tiles, row, block, weight)
        if has_min:
            m = t[..., 16:32].contiguous().view(torch.float16).float().permute(0, 2, 1)[..., None]
            return (d * q + m).reshape(-1, k)[:n]
        return (d * (q - 8)).reshape(-1, k)[:n]

    def _dequantize_q4_k(self) -> torch.Tensor:
        """Q4_K tiles (q4kx8_repack): per super-block 8 fp16 d, 8 fp16 dmin, then 8 sub-blocks of (8 sc, 8 mn,
        128 code bytes laid out as the Q4_1 tiles')."""
        n, k = self.out_features, self.in_features
        t = self.tiles.view(-1, k // 256, 1184)  # (tiles, super-blocks, bytes)
        d, dmin = (t[..., a:a + 16].contiguous().view(torch.float16).float() for a in (0, 16))  # (tiles, S, 8 rows)
        sub = t[..., 32:].reshape(*t.shape[:2], 8, 144)  # (tiles, S, j, bytes)
        sc, mn = sub[..., 0:8].float(), sub[..., 8:16].float()  # (tiles, S, j, 8 rows)
        codes = sub[..., 16:].reshape(*sub.shape[:3], 4, 8, 4)  # (.., j, k, row, byte)
        q = torch.cat([codes & 15, codes >> 4], dim=3).float()  # (.., j, 8 [lo k | hi k], row, byte)
        q = q.permute(0, 1, 4, 2, 3, 5).reshape(*t.shape[:2], 8, 8, 32)  # (tiles, S, row, j, weight)
        scale = (d[..., None] * sc.transpose(2, 3))[..., None]  # (tiles, S, row, j, 1)
        low = (dmin[..., None] * mn.transpose(2, 3))[..., None]
        w = scale * q - low  # (tiles, S, row, j, weight)
        return w.permute(0, 2, 1, 3, 4).reshape(-1, k)[:n]

    def _dequantize_q6_k(self) -> torch.Tensor:
        """Q6_K tiles (q6kx8_repack): per super-block 8 fp16 d, then 8 sub-blocks of (8 + 8 int8 scales for their
        weights 0-15 and 16-31, the codes' low 4 bits as the Q4 tiles', their top 2 bits in H_01 and H_23)."""
        n, k = self.out_features, self.in_features
        t = self.tiles.view(-1, k // 256, 1680)  # (tiles, super-blocks, bytes)
        d = t[..., :16].contiguous().view(torch.float16).float()  # (tiles, S, 8 rows)
        sub = t[..., 16:].reshape(*t.shape[:2], 8, 208)  # (tiles, S, j, bytes)
        sc = sub[..., :16].contiguous().view(torch.int8).float().reshape(*sub.shape[:3], 2, 8)  # (.., j, half, row)
        low = sub[..., 16:144].reshape(*sub.shape[:3], 4, 8, 4).long()  # (.., j, k, row, byte)
        high = sub[..., 144:208].reshape(*sub.shape[:3], 2, 8, 4).long()  # (.., j, k // 2, row, byte)
        top = torch.stack([high[..., kk // 2, :, :] >> (4 * (kk % 2)) for kk in range(4)], dim=3)  # (.., j, k, row, byte)
        q_lo = (low & 15) | ((top & 3) << 4)  # weights 4k + i
        q_hi = (low >> 4) | (((top >> 2) & 3) << 4)  # weights 16 + 4k + i
        q = torch.cat([q_lo, q_hi], dim=3).float() - 32  # (.., j, 8 [lo k | hi k], row, byte)
        q = q.permute(0, 1, 4, 2, 3, 5).reshape(*t.shape[:2], 8, 8, 2, 16)  # (tiles, S, row, j, half, weight)
        scale = d[..., None, None, None] * sc.permute(0, 1, 4, 2, 3)[..., None]  # (tiles, S, row, j, half, 1)
        w = (scale * q).reshape(*t.shape[:2], 8, 256)  # (tiles, S, row, weight)
        return w.permute(0, 2, 1, 3).reshape(-1, k)[:n]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.ggml_type} in tiles of 8 rows")

