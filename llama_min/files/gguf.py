"""The one GGUF file reader: header, metadata key/values and the tensor directory.

A GGUF (v2/v3) file is::

    b"GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, n_dims x u64 dims, u32 ggml type, u64 offset)
    padding to ``general.alignment`` (default 32), then the tensor data (offsets count from there)

Value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64,
12 f64. A string is a u64 byte length + UTF-8 bytes; an array is u32 item type, u64 count, then the items.

This module knows nothing about tokenizers or models: ``llama_min.formats.gguf.read`` turns the tensor
directory into weights, ``llama_min.text.tokenizer`` turns the ``tokenizer.*`` keys into a tokenizer. It is a
small stdlib reader because ``gguf.GGUFReader`` takes ~9 s on Llama 3's 128256-token vocabulary (it wraps
every string in a numpy view); the tests check it against the ``gguf`` package.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from ..errors import LlamaMinError

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


# The ggml tensor types: id -> (name, weights per block, bytes per block). The gguf package has the same
# table (tests/test_gguf.py checks this one against it), but importing it costs ~0.1 s (it imports
# sentencepiece and yaml), a tenth of a small model's whole start.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}


GGML_BLOCKS = {name: (block, nbytes) for name, block, nbytes in GGML_TYPES.values()}  # name -> (weights, bytes)


def ggml_type_info(type_id: int, tensor: str) -> tuple:
    """(name, weights per block, bytes per block) of a ggml type id; a one-line error for an unknown id."""
    if type_id not in GGML_TYPES:
        raise LlamaMinError(f"tensor '{tensor}': unknown ggml type {type_id}")
    return GGML_TYPES[type_id]


def read_gguf_metadata(path: str | Path, prefix: str | None = None) -> dict:
    """All metadata key/values of a GGUF file, or those whose key starts with ``prefix``.

    Arrays come back as Python lists, strings as str.
    """
    return _read_header(path, prefix, tensors=False)[0]


def read_gguf_tensor_infos(path: str | Path, skip: str | None = None):
    """(metadata, tensors): tensors = [(name, dims in ggml order, ggml type, absolute byte offset), ...].

    skip: leave out the keys starting with it, without decoding their values (``"tokenizer."``: a model
    loader's read does not build ~100k Python strings for a vocabulary the tokenizer reads on its own).
    """
    return _read_header(path, None, tensors=True, skip=skip)


def _read_header(path, prefix, tensors: bool, skip: str | None = None):
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LlamaMinError(f"{path}: not a GGUF file (no 'GGUF' magic)")
        raw = f.read(4)
        version = struct.unpack("<I", raw)[0] if len(raw) == 4 else 0
        if version not in (2, 3):
            raise LlamaMinError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                meta, pos = _parse_kv(buf, prefix, skip)
                return meta, (_parse_tensor_infos(buf, pos, meta) if tensors else None)
            except (struct.error, IndexError, KeyError, UnicodeDecodeError) as err:
                raise LlamaMinError(f"{path}: corrupt or unsupported GGUF metadata ({err!r})") from None


def _parse_kv(buf, prefix: str | None, skip: str | None = None):
    _n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos, out = 24, {}
    for _ in range(n_kv):
        key, pos = _read_str(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        keep = (prefix is None or key.startswith(prefix)) and (skip is None or not key.startswith(skip))
        value, pos = _read_value(buf, pos + 4, vtype, keep)
        if keep:
            out[key] = value
    return out, pos


def _parse_tensor_infos(buf, pos: int, meta: dict) -> list:
    """Each tensor: name, u32 n_dims, n_dims x u64 dims, u32 type, u64 offset (from the aligned data start)."""
    (n_tensors,) = struct.unpack_from("<Q", buf, 8)
    infos = []
    for _ in range(n_tensors):
        name, pos = _read_str(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(dims), ggml_type, offset))
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    return [(name, dims, t, start + off) for name, dims, t, off in infos]


def _read_str(buf, pos: int):
    """(string, position after it): a u64 byte length, then UTF-8 bytes."""
    items, pos = _read_strings(buf, pos, 1, True)
    return items[0], pos


def _read_value(buf, pos: int, vtype: int, keep: bool = True):
    """(value, position after it); keep=False: (None, position after it), nothing decoded."""
    if vtype == 8:
        items, pos = _read_strings(buf, pos, 1, keep)
        return (items[0] if keep else None), pos
    if vtype != 9:
        fmt = "<" + _SCALAR[vtype]
        return (struct.unpack_from(fmt, buf, pos)[0] if keep else None), pos + struct.calcsize(fmt)
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type in _SCALAR:                          # numbers: one unpack for the whole array
        fmt = f"<{count}{_SCALAR[item_type]}"
        return (list(struct.unpack_from(fmt, buf, pos)) if keep else None), pos + struct.calcsize(fmt)
    if item_type == 8:  # strings (a vocabulary: 50k-130k of them): one tight loop
        return _read_strings(buf, pos, count, keep)
    items = []
    for _ in range(count):
        item, pos = _read_value(buf, pos, item_type, keep)
        if keep:
            items.append(item)
    return (items if keep else None), pos


_U64 = struct.Struct("<Q").unpack_from


def _read_strings(buf, pos: int, count: int, keep: bool):
    """`count` strings from `pos` -> (list, or None without keep: nothing decoded; position after them), in one
    loop (an array of Llama 3's 128,256 tokens and 280,147 merges: 0.14 s, 0.22 s item by item)."""
    items, end = ([None] * count if keep else None), len(buf)
    for i in range(count):
        (n,) = _U64(buf, pos)
        pos += 8
        if pos + n > end:
            raise IndexError("string runs past the end of the file")
        if keep:
            items[i] = buf[pos:pos + n].decode("utf-8")
        pos += n
    return items, pos
