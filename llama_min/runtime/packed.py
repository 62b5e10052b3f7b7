"""Quantized GGUF files run at their own precision: the file's blocks multiplied where they are, or converted once.

`load_gguf_packed(path)` builds a Transformer whose linear layers are read from the memory-mapped file
tensor by tensor; no float copy of the model exists at any time. Where llama_min's C kernels run (x86-64
Linux with AVX2, native.enabled()):

  Q4_0, Q4_1, Q8_0  with AVX-512 VNNI: regrouped into tiles of 8 rows (blocks.TiledLinear; the same bytes,
                    the file's weights bit for bit, file pages released as it goes); else held as stored
                    (blocks.BlockLinear): views of the mapped file, no conversion at load. An embedding table
                    is always held as stored (BlockEmbedding), and a tied output then reads its blocks.
  Q4_K              with AVX-512 VNNI: tiles of 8 rows of its own (native.q4kx8_repack: the file's weights
                    exactly, the 6-bit sub-block scales and mins a byte each, 148/144 of the file's bytes); else
                    converted in C to the 'avx2' 4-bit layout (native.q4k_to_avx2: scale d*sc, min -dmin*mn
                    per group of 32 rounded to fp16, 2^-11 relative)
  Q6_K              with AVX-512 VNNI: tiles of 8 rows of its own (native.q6kx8_repack: the file's bytes and
                    weights exactly); else converted in C to int8 per output row (native.q6k_to_int8:
                    |change| <= max|w_row| / 254)
  Q5_0, Q5_1, Q5_K, Q2_K, Q3_K   dequantized a chunk of rows at a time (gguf.quants) and requantized to
                    int8 per row, as Q6_K
  F32, F16, BF16    float (norms always; a float linear layer stays float)
  anything else (IQ*, TQ*, ...)  float, with one warning line naming the tensor and its type

Elsewhere (no AVX2 kernels: PyTorch's int4/int8 kernels) the 4-bit types are repacked into int4 groups of 32
and the 8-bit ones requantized per row; ggml block layouts (little-endian, blocks along each row):

  Q4_0  32 weights: fp16 d, 16 bytes (low nibbles = elements 0-15, high = 16-31); w = d * (q - 8)
        -> int4 group 32: scale = d, zero = 0                                         (exact)
  Q4_1  32 weights: fp16 d, fp16 m, 16 bytes as Q4_0; w = d * q + m
        -> int4 group 32: scale = d, zero = m + 8 d   ((q - 8) d + zero = d q + m)    (exact up to bf16)
  Q4_K  256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32,
        128 bytes: 32-byte chunk c holds sub-block 2c in its low nibbles, 2c+1 in its high ones;
        w = d * sc * q - dmin * mn
        -> int4 group 32: scale = d sc, zero = 8 d sc - dmin mn                       (exact up to bf16)

"Exact up to bf16": PyTorch's 4-bit kernels keep scale and zero in bf16 (8 significant bits), so d and
zero are rounded to bf16, a relative change of at most 2^-8 (0.4%) of each: a weight moves by at most
|q - 8| * |d| * 2^-8 + |zero| * 2^-8; nothing else changes. The codes q are the file's own.

Repacked or converted matrices release their file pages as they go (resident memory holds the model,
not the file as well); matrices held as stored keep theirs mapped (they are the model). What a load
converts is written once to the layout cache, and the next load of the same file maps it from there
(layout_cache.py: 0.3-0.44 s instead of 6-9.4 s for the 8B shape's files, measured).
A quantized token_embd becomes a BlockEmbedding, an `Int4Embedding` (same 4-bit codes, unpacked per
looked-up row), an `Int4RowsEmbedding` (Q4_K) or an `Int8Embedding`.
"""

from __future__ import annotations

import functools
import mmap
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import shapes_only
from ..errors import LlamaMinError
from ..model import Transformer
from . import hugepages, native
from .blocks import BLOCK_TYPES, BlockEmbedding, BlockLinear, TiledLinear
from .layout_cache import MADV_POPULATE_READ, LayoutCache, open_cache
from .memory import check_window, return_freed_memory
from .int4_layouts import int4_layout
from .quantize import (PLAIN_INT4, Int4Embedding, Int4Linear, Int4RowsEmbedding, Int8Embedding, Int8Linear,
                       chunk_rows, int4_from_rows, int8_from_rows, quantize_per_channel)
from ..formats.common import expected_shapes, rope_override
from ..files.gguf import GGML_TYPES, ggml_type_info
from ..formats.gguf.read import args_from_gguf, gguf_to_meta_name

FLOAT_TYPES = ("F32", "F16", "BF16")
INT8_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q2_K", "Q3_K")
GROUP = 32  # every 4-bit type maps onto int4 groups of 32


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) bytes of little-endian fp16 -> (...,) float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32) int32 codes: the low nibbles are elements 0-15, the high nibbles 16-31."""
    qs = qs.to(torch.int32)  # the CPU packing kernel takes int32: convert once, on half the elements
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def decode_q4_0(b: torch.Tensor):
    """(r, blocks, 18) bytes -> codes (r, blocks*32), scale (r, blocks), zero (r, blocks)."""
    d = _fp16(b[..., 0:2])
    return _nibbles(b[..., 2:18]).flatten(1), d, torch.zeros_like(d)


def decode_q4_1(b: torch.Tensor):
    """(r, blocks, 20) bytes -> codes, scale = d, zero = m + 8 d."""
    d, m = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    return _nibbles(b[..., 4:20]).flatten(1), d, m + 8 * d


def q4_k_scales_mins(s: torch.Tensor):
    """(..., 12) bytes -> 6-bit scales and mins (..., 8) of the 8 sub-blocks.

    Sub-blocks 0-3: scale = low 6 bits of byte j, min = low 6 bits of byte j+4. Sub-blocks 4-7: the low
    4 bits come from byte j+4 (low nibble: scale, high nibble: min), the top 2 bits from the top 2 bits of
    byte j-4 (scale) and byte j (min).
    """
    s = s.to(torch.int32)
    lo_sc, lo_mn = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    hi_mn = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], dim=-1), torch.cat([lo_mn, hi_mn], dim=-1)


def decode_q4_k(b: torch.Tensor):
    """(r, blocks, 144) bytes -> codes (r, blocks*256), scale = d sc, zero = 8 d sc - dmin mn per 32."""
    r, nb = b.shape[:2]
    d, dmin = _fp16(b[..., 0:2])[..., None], _fp16(b[..., 2:4])[..., None]
    sc, mn = q4_k_scales_mins(b[..., 4:16])
    qs = b[..., 16:144].reshape(r, nb, 4, 1, 32).to(torch.int32)
    q = torch.cat([qs & 15, qs >> 4], dim=3)  # (r, nb, 4 chunks, low|high, 32): sub-blocks 2c, 2c+1
    scale = d * sc.float()
    return q.reshape(r, nb * 256), scale.reshape(r, nb * 8), (8 * scale - dmin * mn.float()).reshape(r, nb * 8)


INT4_DECODERS = {"Q4_0": decode_q4_0, "Q4_1": decode_q4_1, "Q4_K": decode_q4_k}


class GGUFTensor:
    """One tensor of the memory-mapped file: its name, ggml type, shape (rows, cols) and bytes, by rows."""

    def __init__(self, buf: mmap.mmap, name: str, dims, ggml_type: int, offset: int):
        self.buf, self.name, self.offset, self.type_id = buf, name, offset, ggml_type
        self.type_name, self.block, self.block_bytes = ggml_type_info(ggml_type, name)
        self.shape = tuple(int(s) for s in reversed(dims))  # ggml lists dims innermost-first
        self.row_bytes = self.shape[-1] // self.block * self.block_bytes
        self.nbytes = int(np.prod(self.shape[:-1], dtype=np.int64)) * self.row_bytes
        if offset + self.nbytes > len(buf):
            raise LlamaMinError(f"tensor '{name}' runs past the end of the file (truncated download?)")

    def blocks(self) -> torch.Tensor:
        """The tensor's bytes where the file is mapped, (rows, row_bytes) uint8: a view, not a copy (the loader
        maps the file copy-on-write). From a read-only mapping, a copy: a write through a view would crash."""
        if not _writable(self.buf):
            return torch.from_numpy(self.raw_rows(0, self.shape[0]))
        flat = torch.frombuffer(self.buf, dtype=torch.uint8, count=self.nbytes, offset=self.offset)
        return flat.view(-1, self.row_bytes)

    def held_as_stored(self, device) -> bool:
        """Whether a matrix of this type is multiplied where the file holds it (blocks.py): Q4_0, Q4_1 and
        Q8_0 on a CPU where llama_min's kernels run."""
        return self.type_name in BLOCK_TYPES and torch.device(device).type == "cpu" and native.enabled()

    def raw_rows(self, r0: int, r1: int) -> np.ndarray:
        """Bytes of rows r0..r1-1, copied out of the mapping: (r1 - r0, row_bytes) uint8."""
        start = self.offset + r0 * self.row_bytes
        return np.frombuffer(self.buf, np.uint8, (r1 - r0) * self.row_bytes, start).reshape(r1 - r0, -1).copy()

    def release(self, start: int = 0, end: Optional[int] = None):
        """Drop the file pages of bytes [start, end) of this tensor from the process (the OS page cache
        keeps them): resident memory then holds the model being built, not the file as well."""
        end = self.nbytes if end is None else end
        page = mmap.PAGESIZE
        first = (self.offset + start) // page * page
        if end > start and hasattr(self.buf, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self.buf.madvise(mmap.MADV_DONTNEED, first, self.offset + end - first)

    def block_chunks(self):
        """(row0, row1, blocks (row1 - row0, row_bytes) uint8) for consecutive chunks of rows, read where the file
        is mapped (converted in C, blocks.py's kernels); each chunk's file pages released after use."""
        n, rows, blocks = self.shape[0], chunk_rows(self.shape[-1]), self.blocks()
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            self.populate(r0 * self.row_bytes, r1 * self.row_bytes)
            yield r0, r1, blocks[r0:r1]
            self.release(r0 * self.row_bytes, r1 * self.row_bytes)

    def populate(self, start: int, end: int):
        """Map bytes [start, end) of this tensor into the process in one call (MADV_POPULATE_READ, Linux 5.14+)
        instead of one page fault per 4 KB page as they are read: the 8B shape's Q4_0 file regrouped in 3.3 s
        with a fault per page. Elsewhere nothing (the pages fault in as before)."""
        page = mmap.PAGESIZE
        first = (self.offset + start) // page * page
        if end > start and hasattr(self.buf, "madvise"):
            try:
                self.buf.madvise(MADV_POPULATE_READ, first, self.offset + end - first)
            except OSError:  # an older kernel: EINVAL
                pass

    def chunks(self):
        """(row0, bytes) for consecutive chunks of rows (a multiple of 256, ~1M weights each); each chunk's
        file pages are released once copied."""
        n, rows = self.shape[0], chunk_rows(self.shape[-1])
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            raw = self.raw_rows(r0, r1)
            self.release(r0 * self.row_bytes, r1 * self.row_bytes)
            yield r0, raw

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Raw bytes (rows, row_bytes) of this tensor -> float32 values: F32 and F16 read as they are, the
        other types by the gguf package's dequantize."""
        if self.type_name in ("F32", "F16"):
            return raw.view(np.float32 if self.type_name == "F32" else np.float16).astype(np.float32, copy=False)
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        return np.asarray(dequantize(raw, GGMLQuantizationType(self.type_id)), dtype=np.float32)

    def float_rows(self):
        """(row0, float32 (r, K)) chunks, dequantized by the gguf package."""
        for r0, raw in self.chunks():
            yield r0, torch.from_numpy(self.dequantize(raw))

    def int4_rows(self):
        """(row0, codes, scales, zeros) chunks of a Q4_0 / Q4_1 / Q4_K tensor (groups of 32)."""
        decode = INT4_DECODERS[self.type_name]
        for r0, raw in self.chunks():
            b = torch.from_numpy(raw).view(len(raw), -1, self.block_bytes)
            yield (r0, *decode(b))

    def to_float(self, dtype=torch.float32) -> torch.Tensor:
        if len(self.shape) == 1:
            raw = np.frombuffer(self.buf, np.uint8, self.nbytes, self.offset)
            return torch.from_numpy(self.dequantize(raw).copy()).to(dtype)
        out = torch.empty(self.shape, dtype=dtype)
        for r0, w in self.float_rows():
            out[r0 : r0 + len(w)] = w
        return out


def _writable(buf) -> bool:
    with memoryview(buf) as view:
        return not view.readonly


def warn_unsupported(t: GGUFTensor):
    print(f"warning: tensor '{t.name}' has type {t.type_name}, which the packed loader does not support; "
          "it is dequantized to float", file=sys.stderr, flush=True)


def converted_in_c(t: GGUFTensor, device) -> bool:
    """Whether a Q4_K / Q6_K matrix is converted by llama_min's C code (native.q4k_to_avx2 / q6k_to_int8)
    rather than dequantized in Python (gguf.quants) and requantized: on a CPU where the kernels run."""
    return t.type_name in ("Q4_K", "Q6_K") and torch.device(device).type == "cpu" and native.enabled()


def q4_k_in_c(t: GGUFTensor) -> dict:
    """A Q4_K matrix in the 'avx2' 4-bit layout: codes (N, K/2) uint8, dc (N, 2, K/32) fp16."""
    n, k = t.shape
    codes = hugepages.empty((n, k // 2), torch.uint8)
    dc = torch.empty(n, 2, k // GROUP, dtype=torch.float16)
    for r0, r1, blocks in t.block_chunks():
        native.q4k_to_avx2(blocks, k, codes[r0:r1], dc[r0:r1])
    return {"codes": codes, "dc": dc}


def tiled_in_c(t: GGUFTensor) -> dict:
    """{"tiles": bytes} of a Q4_0 / Q4_1 / Q4_K / Q6_K / Q8_0 matrix regrouped into tiles of 8 rows
    (native.tile_blocks), chunk by chunk from the mapped file, each chunk's file pages released once regrouped:
    resident memory holds one copy, the file's weights exactly."""
    n, k = t.shape
    kind = t.type_name
    out = hugepages.empty((native.tiled_bytes(kind, n, k),), torch.uint8)
    for r0, r1, blocks in t.block_chunks():  # chunks of a multiple of 256 rows: whole tiles
        native.tile_blocks(blocks, kind, k, out[native.tiled_bytes(kind, r0, k) : native.tiled_bytes(kind, r1, k)])
    return {"tiles": out}


def tiled(t: GGUFTensor, device) -> bool:
    """Whether a matrix of this type is tiled (blocks.TiledLinear): Q4_0, Q4_1, Q4_K, Q8_0 and Q6_K on a CPU with
    AVX-512 VNNI where llama_min's kernels run."""
    return t.type_name in native.TILED_TYPES and torch.device(device).type == "cpu" and native.vnni()


def q6_k_in_c(t: GGUFTensor) -> dict:
    """A Q6_K matrix as int8 per row: q (N, K) int8, scales (N,) float32."""
    n, k = t.shape
    q, scales = hugepages.empty((n, k), torch.int8), torch.empty(n, dtype=torch.float32)
    for r0, r1, blocks in t.block_chunks():
        native.q6k_to_int8(blocks, k, q[r0:r1], scales[r0:r1])
    return {"q": q, "scales": scales}


def converted(t: GGUFTensor, how: str, make, cache: Optional[LayoutCache]) -> dict:
    """The tensors make() converts t into (`how` names the conversion): from the cached layout when it holds
    them, else made now (and kept for the cache; layout_cache.py)."""
    return make() if cache is None else cache.parts(t.name, how, make)


def k_quant_in_c(t: GGUFTensor, cache: Optional[LayoutCache]) -> dict:
    """A Q4_K matrix in the 'avx2' 4-bit layout (q4_k_in_c), or a Q6_K one as int8 rows (q6_k_in_c), through the
    layout cache: what a linear layer and an embedding table alike are built from where converted_in_c."""
    if t.type_name == "Q4_K":
        return converted(t, "avx2 int4", lambda: q4_k_in_c(t), cache)
    return converted(t, "int8 rows", lambda: q6_k_in_c(t), cache)


def packed_linear(t: GGUFTensor, device, dtype, cache: Optional[LayoutCache] = None) -> nn.Module:
    """The layer computing x W^T for file tensor W (N, K): TiledLinear, BlockLinear, Int4Linear, Int8Linear or
    a float nn.Linear. cache: where converted layouts are read from and kept (None: made every load)."""
    n, k = t.shape
    if tiled(t, device):
        tiles = converted(t, f"tiles {t.type_name}", lambda: tiled_in_c(t), cache)["tiles"]
        return TiledLinear(tiles, t.type_name, k, n)
    if t.held_as_stored(device):
        return BlockLinear(t.blocks(), t.type_name, k)
    if converted_in_c(t, device):
        p = k_quant_in_c(t, cache)
        if t.type_name == "Q4_K":
            return Int4Linear(p["codes"], p["dc"], k, GROUP, int4_layout(device, n, k, GROUP))
        return Int8Linear(p["q"], p["scales"])
    if t.type_name in INT4_DECODERS:
        return int4_from_rows(n, k, GROUP, t.int4_rows(), device)
    if t.type_name in INT8_TYPES:
        return int8_from_rows(n, k, t.float_rows(), device)
    if t.type_name not in FLOAT_TYPES:
        warn_unsupported(t)
    lin = nn.Linear(k, n, bias=False, device="meta")
    lin.weight = nn.Parameter(t.to_float(dtype).to(device), requires_grad=False)
    return lin


def tied_output(t: GGUFTensor, device, dtype, cache: Optional[LayoutCache] = None) -> nn.Module:
    """The output layer of a model whose output is its token embedding: where the embedding reads the mapped
    file's blocks, the same blocks (one copy of the table); else the layer packed_linear builds."""
    if t.held_as_stored(device):
        return BlockLinear(t.blocks(), t.type_name, t.shape[1])
    return packed_linear(t, device, dtype, cache)


def packed_embedding(t: GGUFTensor, device, dtype, cache: Optional[LayoutCache] = None) -> nn.Module:
    """The token embedding table: BlockEmbedding, Int4Embedding, Int4RowsEmbedding, Int8Embedding or a float
    nn.Embedding."""
    v, dim = t.shape
    if t.held_as_stored(device):
        return BlockEmbedding(t.blocks(), t.type_name, dim)
    if converted_in_c(t, device):
        p = k_quant_in_c(t, cache)
        return Int4RowsEmbedding(p["codes"], p["dc"]) if t.type_name == "Q4_K" else Int8Embedding(p["q"], p["scales"])
    if t.type_name in INT4_DECODERS:
        packed = hugepages.empty((v, dim // 2), torch.uint8, device)
        sz = torch.empty(v, dim // GROUP, 2, dtype=torch.bfloat16, device=device)
        for r0, q, scales, zeros in t.int4_rows():
            r1 = r0 + len(q)
            packed[r0:r1] = PLAIN_INT4.pack(q).to(device)
            sz[r0:r1, :, 0], sz[r0:r1, :, 1] = scales, zeros
        return Int4Embedding(packed, sz, GROUP)
    if t.type_name in INT8_TYPES:
        q = hugepages.empty((v, dim), torch.int8, device)
        s = torch.empty(v, dtype=torch.float32, device=device)
        for r0, w in t.float_rows():
            q[r0 : r0 + len(w)], s[r0 : r0 + len(w)] = quantize_per_channel(w.to(device))
        return Int8Embedding(q, s)
    if t.type_name not in FLOAT_TYPES:
        warn_unsupported(t)
    emb = nn.Embedding(v, dim, device="meta")
    emb.weight = nn.Parameter(t.to_float(dtype).to(device), requires_grad=False)
    return emb


def model_header(path) -> tuple:
    """(metadata without the tokenizer's keys, tensor infos) of a GGUF file, read once per version of the file:
    use_packed and load_gguf_packed both ask for it (walking Llama 3's vocabulary to skip it takes ~0.2 s).
    Keyed by the file's path, size and modification time, so a changed file is read again. Read-only."""
    path = Path(path).resolve()
    stat = path.stat()
    return _model_header(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _model_header(path: Path, size: int, mtime_ns: int) -> tuple:
    from ..files.gguf import read_gguf_tensor_infos

    return read_gguf_tensor_infos(path, skip="tokenizer.")


def is_quantized_gguf(path) -> bool:
    """True for a GGUF file holding any quantized matrix (so the packed path applies)."""
    _, infos = model_header(path)
    return any(len(dims) == 2 and GGML_TYPES.get(t, ("?",))[0] not in FLOAT_TYPES for _, dims, t, _ in infos)


def use_packed(path, packed, dtype, quantize) -> bool:
    """Whether Llama.build loads `path` packed: packed=True/False decides; None = yes for a quantized GGUF
    when neither a float dtype nor a quantize= was asked for."""
    if packed is False:
        return False
    path = Path(path)
    if not path.is_file():
        quantized = False
    else:
        with open(path, "rb") as f:
            quantized = f.read(4) == b"GGUF" and is_quantized_gguf(path)
    if packed and (not quantized or quantize is not None):
        raise LlamaMinError(f"{path}: packed=True needs a quantized GGUF file and no quantize= "
                            f"(got quantize={quantize!r})")
    return quantized and (packed or (dtype is None and quantize is None))


def _place(model: Transformer, meta_name: str, t: GGUFTensor, device, dtype, cache: Optional[LayoutCache]):
    """Put file tensor t into the model under its Meta name (a module for matrices, a Parameter for norms)."""
    path = meta_name.rsplit(".", 1)[0]  # "layers.0.attention.wq"
    parent, _, attr = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if meta_name == "tok_embeddings.weight":
        setattr(owner, attr, packed_embedding(t, device, dtype, cache))
    elif len(t.shape) == 2:
        setattr(owner, attr, packed_linear(t, device, dtype, cache))
    else:
        getattr(owner, attr).weight = nn.Parameter(t.to_float(dtype).to(device), requires_grad=False)


def _tensors(path: Path, buf, infos, args) -> dict:
    """Meta name -> GGUFTensor, shapes checked against the model's; rope_freqs applied to args."""
    want = expected_shapes(args)
    out = {}
    for name, dims, ggml_type, offset in infos:
        try:
            t = GGUFTensor(buf, name, dims, ggml_type, offset)
            if name == "rope_freqs.weight":  # Llama 3.1+ scaling as per-pair divisors of theta_i
                args.rope_freq_divisors = [float(x) for x in t.to_float()]
                continue
            meta_name = gguf_to_meta_name(name)
        except (ValueError, KeyError) as e:
            raise LlamaMinError(f"{path}: tensor '{name}': {e}") from None
        if meta_name not in want or want[meta_name] != t.shape:
            raise LlamaMinError(f"{path}: tensor '{name}' has shape {list(t.shape)}, expected "
                                f"{list(want.get(meta_name, ()))}")
        out[meta_name] = t
    missing = sorted(set(want) - set(out) - ({"output.weight"} if args.tie_word_embeddings else set()))
    if missing:
        raise LlamaMinError(f"{path}: missing tensor '{missing[0]}' (expected shape {list(want[missing[0]])})")
    return out


def _holds_mapped_blocks(model: Transformer, meta_name: str) -> bool:
    """Whether the module built from tensor `meta_name` reads the mapped file's blocks (a tied output reads
    them exactly when the embedding does: tied_output)."""
    return isinstance(model.get_submodule(meta_name.rsplit(".", 1)[0]), (BlockLinear, BlockEmbedding))


def gguf_header_args(path):
    """(ModelArgs, tensor infos) of a GGUF file from its header alone (no weight is read): tied embeddings
    when there is no output.weight, the vocabulary size from token_embd when the metadata has none."""
    meta, infos = model_header(path)
    args = args_from_gguf(meta)
    names = {name for name, *_ in infos}
    args.tie_word_embeddings = "output.weight" not in names
    if args.vocab_size <= 0 and "token_embd.weight" in names:
        args.vocab_size = int(next(dims for name, dims, *_ in infos if name == "token_embd.weight")[1])
    return args, infos


def load_gguf_packed(path, device="cpu", dtype=torch.float32, max_seq_len=None,
                     max_batch_size: int = 1, rope_scaling=None, layout_cache: bool = True) -> Transformer:
    """A Transformer for a GGUF file with its quantized matrices packed (see the module docstring).

    Norms (and any float tensor) are loaded in `dtype`. Built on the meta device, then every module
    is created directly on `device` from the file's bytes. Before any weight is read, the window's peak
    (max_seq_len x max_batch_size: RoPE table, KV cache, a forward) is checked against free memory
    (memory.check_window). `rope_scaling`: Llama.build's override of the file's RoPE scaling.
    layout_cache: map the converted matrices from the layout the last load of this file wrote, and write one
    when anything was converted (layout_cache.py; also off with LLAMA_MIN_LAYOUT_CACHE=0).
    """
    from tqdm import tqdm

    path, device = Path(path), torch.device(device)
    args, infos = gguf_header_args(path)
    rope_override(args, rope_scaling)  # before max_seq_len: dynamic's M defaults to the file's window
    if max_seq_len:
        args.max_seq_len = max_seq_len
    check_window(args, args.max_seq_len, max_batch_size, device, torch.empty((), dtype=dtype).element_size())
    with open(path, "rb") as f:  # copy-on-write: the model's block views are writable, the file never written
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if hasattr(buf, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        buf.madvise(mmap.MADV_WILLNEED)  # read ahead from disk while the model is put together
    tensors = _tensors(path, buf, infos, args)
    rope_override(args, rope_scaling)  # again: it replaces rope_freqs' divisors too
    cache = open_cache(path, tensors.values(), layout_cache) if device.type == "cpu" else None
    with shapes_only():
        model = Transformer(args)
    for meta_name, t in tqdm(tensors.items(), desc="packing", unit="tensor", leave=False, disable=None):
        try:
            _place(model, meta_name, t, device, dtype, cache)
            if meta_name == "tok_embeddings.weight" and args.tie_word_embeddings:
                model.output = tied_output(t, device, dtype, cache)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise LlamaMinError(f"{path}: tensor '{t.name}' ({t.type_name}): {e}") from None
        if len(t.shape) == 2 and not _holds_mapped_blocks(model, meta_name):  # repacked, converted or tiled:
            # the file's pages are no longer needed
            t.release()
            return_freed_memory()
    if cache is not None:
        cache.save()
    return model.eval().requires_grad_(False)
