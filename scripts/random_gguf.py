#!/usr/bin/env python
"""Random-weight GGUF files of real model shapes (Llama 3 8B, TinyLlama 1.1B), written once and cached.

    python scripts/random_gguf.py --shape llama3-8b --type q4_0 [--out PATH]

or from Python: ``random_gguf("llama3-8b", "q4_k_m") -> Path``. The weights are random but valid blocks
(random code bytes, fp16 scale fields set so weights are ~0.01-0.1), norms are 1.0, and the metadata is what
llama_min and llama.cpp need, with a real tokenizer: every ``tokenizer.*`` key of llama.cpp's vocabulary file
of the model family (fetched by ``python -m llama_min.assets fetch``). They are for measuring load time and
memory at real sizes (tests/test_big_gguf.py), not for text.

Files go to llama_min's asset cache, ``llama_min.assets.cache_dir() / "random"``, under a name from the shape
and type; a file already there is reused. Each is written tensor by tensor, a few MiB of rows at a time
(never the whole model in memory), to a temporary name in the same folder and renamed when complete, so an
interrupted run never leaves a file that looks finished.

Types: q4_0, q4_1, q8_0 (every matrix in that type) and q4_k_m, llama.cpp's Q4_K_M recipe: Q4_K everywhere
except output.weight (Q6_K) and attn_v / ffn_down in the layers llama.cpp gives more bits (use_more_bits:
layer i of n with i < n/8, i >= 7n/8 or (i - n/8) % 3 == 2), Q6_K there. Norms are F32.
"""

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES, GGML_QUANT_VERSION


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    rope_theta: float
    context: int
    vocab_asset: str  # llama_min.assets name of llama.cpp's vocabulary GGUF the tokenizer keys come from
    tied: bool = False


SHAPES = {
    "llama3-8b": Shape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336, vocab=128256,
                       rope_theta=500000.0, context=8192, vocab_asset="llama3-vocab-gguf"),
    "tinyllama-1.1b": Shape(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn=5632, vocab=32000,
                            rope_theta=10000.0, context=2048, vocab_asset="llama2-vocab-gguf"),
}

# --type -> (general.file_type, the label in general.name)
TYPES = {
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, "Q4_0"),
    "q4_1": (LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, "Q4_K_M"),
}

# fp16 fields of each block type set to fixed values, (byte offset, value); every other byte is random.
# The sizes keep weights ~0.01-0.1 (the largest |w| is in the comment).
SCALE_FIELDS = {
    Q.Q4_0: [(0, 0.01)],  # 18 B: fp16 d, 16 B of nibbles; w = d*(q-8): |w| <= 0.08
    Q.Q4_1: [(0, 0.01), (2, -0.08)],  # 20 B: fp16 d, fp16 m, 16 B of nibbles; w = d*q + m: -0.08..0.07
    Q.Q8_0: [(0, 5e-4)],  # 34 B: fp16 d, 32 int8; w = d*q: |w| <= 0.064
    Q.Q4_K: [(0, 1e-4), (2, 1e-3)],  # 144 B: fp16 d, fp16 dmin, 12 B of 6-bit sc/m, 128 B of nibbles;
    #                                  w = d*sc*q - dmin*m: -0.063..0.095
    Q.Q6_K: [(208, 2e-5)],  # 210 B: 128 B low nibbles, 64 B high 2 bits, 16 int8 sc, fp16 d at 208;
    #                         w = d*sc*(q-32): |w| <= 0.082
}

CHUNK_BYTES = 16 << 20  # rows generated and written at a time


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits (llama-quant.cpp): the layers Q4_K_M gives Q6_K attn_v / ffn_down."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(shape: str, qtype: str, n_layers: Optional[int] = None) -> dict:
    """GGUF tensor name -> (GGMLQuantizationType, numpy shape (rows, cols)), in file order."""
    s, n = SHAPES[shape], n_layers or SHAPES[shape].n_layers
    if qtype == "q4_k_m":
        matrix, output = Q.Q4_K, Q.Q6_K
        more = lambda i: Q.Q6_K if use_more_bits(i, n) else Q.Q4_K  # noqa: E731
    else:
        matrix = output = Q[qtype.upper()]
        more = lambda i: matrix  # noqa: E731
    d, kv, f = s.dim, s.n_kv_heads * (s.dim // s.n_heads), s.ffn
    plan = {"token_embd.weight": (matrix, (s.vocab, d))}
    for i in range(n):
        plan.update({f"blk.{i}.attn_norm.weight": (Q.F32, (d,)),
                     f"blk.{i}.attn_q.weight": (matrix, (d, d)),
                     f"blk.{i}.attn_k.weight": (matrix, (kv, d)),
                     f"blk.{i}.attn_v.weight": (more(i), (kv, d)),
                     f"blk.{i}.attn_output.weight": (matrix, (d, d)),
                     f"blk.{i}.ffn_norm.weight": (Q.F32, (d,)),
                     f"blk.{i}.ffn_gate.weight": (matrix, (f, d)),
                     f"blk.{i}.ffn_up.weight": (matrix, (f, d)),
                     f"blk.{i}.ffn_down.weight": (more(i), (d, f))})
    plan["output_norm.weight"] = (Q.F32, (d,))
    if not s.tied:
        plan["output.weight"] = (output, (s.vocab, d))
    return plan


def default_path(shape: str, qtype: str, n_layers: Optional[int] = None) -> Path:
    from llama_min.assets import cache_dir

    layers = f"-{n_layers}layers" if n_layers and n_layers != SHAPES[shape].n_layers else ""
    return cache_dir() / "random" / f"{shape}{layers}-{qtype}.gguf"


def vocab_path(shape: str) -> Path:
    """The cached vocabulary GGUF of the shape's family (fetched by `python -m llama_min.assets fetch`;
    FileNotFoundError, saying so, when it is not there)."""
    from llama_min.assets import asset_path

    return asset_path(SHAPES[shape].vocab_asset, fetch=False)


@functools.lru_cache(maxsize=1)  # several files of one family in a process (tests) read it once
def tokenizer_fields(path: Path) -> dict:
    """Every `tokenizer.*` key of a GGUF file: key -> (value, value type, array item type or None)."""
    out = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == GGUFValueType.ARRAY
            out[key] = (field.contents(), field.types[0], field.types[-1] if array else None)
    return out


class _RandomBlocks:
    """Random valid blocks of one tensor, generated CHUNK_BYTES at a time as they are written.

    GGUFWriter.write_tensor_data takes this in place of an ndarray: it asks for `.nbytes` and calls `.tofile(f)`
    (after writing the alignment padding), so the tensor is never whole in memory."""

    def __init__(self, qtype, rows: int, cols: int, seed):
        block, self.block_bytes = GGML_QUANT_SIZES[qtype]
        assert cols % block == 0, (qtype, cols)
        self.rows, self.row_bytes = rows, cols // block * self.block_bytes
        self.nbytes = rows * self.row_bytes
        self.fields = [(o, np.frombuffer(np.float16(v).tobytes(), np.uint8)) for o, v in SCALE_FIELDS[qtype]]
        self.rng = np.random.default_rng(seed)

    def tofile(self, f):
        step = max(1, CHUNK_BYTES // self.row_bytes)
        for r0 in range(0, self.rows, step):
            n = min(step, self.rows - r0) * self.row_bytes
            raw = self.rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]
            blocks = raw.reshape(-1, self.block_bytes)
            for offset, value in self.fields:
                blocks[:, offset : offset + 2] = value
            f.write(memoryview(raw))


def write_random_gguf(path: Path, shape: str, qtype: str, n_layers: Optional[int] = None, seed: int = 0,
                      progress: Optional[bool] = None) -> None:
    """Write the file at `path` (directly; random_gguf adds the cache and the atomic rename)."""
    s, n = SHAPES[shape], n_layers or SHAPES[shape].n_layers
    file_type, label = TYPES[qtype]
    tokenizer = tokenizer_fields(vocab_path(shape))
    n_tokens = len(tokenizer["tokenizer.ggml.tokens"][0])
    assert n_tokens == s.vocab, f"{s.vocab_asset} has {n_tokens} tokens, {shape} {s.vocab}"
    plan = tensor_plan(shape, qtype, n)

    w = GGUFWriter(path, "llama")
    w.add_name(f"random {shape} {label}" + (f" ({n} layer{'s' * (n != 1)})" if n != s.n_layers else ""))
    w.add_uint32("llama.context_length", s.context)
    w.add_uint32("llama.embedding_length", s.dim)
    w.add_uint32("llama.block_count", n)
    w.add_uint32("llama.feed_forward_length", s.ffn)
    w.add_uint32("llama.attention.head_count", s.n_heads)
    w.add_uint32("llama.attention.head_count_kv", s.n_kv_heads)
    w.add_uint32("llama.rope.dimension_count", s.dim // s.n_heads)
    w.add_float32("llama.rope.freq_base", s.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", s.vocab)
    w.add_file_type(int(file_type))
    w.add_quantization_version(GGML_QUANT_VERSION)
    for key, (value, vtype, sub_type) in tokenizer.items():
        w.add_key_value(key, value, vtype, sub_type)
    for name, (qt, dims) in plan.items():
        if qt == Q.F32:
            w.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            block, size = GGML_QUANT_SIZES[qt]
            row_bytes = dims[1] // block * size
            w.add_tensor_info(name, (dims[0], row_bytes), np.dtype(np.uint8), dims[0] * row_bytes, qt)
    from tqdm import tqdm

    total = sum(_nbytes(qt, dims) for qt, dims in plan.values())
    show = sys.stderr.isatty() if progress is None else progress
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not show) as bar:
            for i, (name, (qt, dims)) in enumerate(plan.items()):
                bar.set_postfix_str(name, refresh=False)
                if qt == Q.F32:
                    w.write_tensor_data(np.ones(dims, np.float32))
                else:
                    w.write_tensor_data(_RandomBlocks(qt, dims[0], dims[1], seed=[seed, i]))
                bar.update(_nbytes(qt, dims))
        for f in w.fout:
            f.flush()
            os.fsync(f.fileno())
    finally:
        w.close()


def _nbytes(qt, dims) -> int:
    block, size = GGML_QUANT_SIZES[qt]
    return int(np.prod(dims)) // block * size


def random_gguf(shape: str, qtype: str, path=None, n_layers: Optional[int] = None, seed: int = 0,
                progress: Optional[bool] = None, quiet: bool = False) -> Path:
    """The random-weight GGUF file of `shape` in `qtype`: `path` (default: the asset cache's random/ folder),
    written only if missing (atomically: llama_min.files.atomic_write).

    n_layers: fewer layers than the shape has (tests); the default file name then says how many.
    progress: tqdm bar per tensor (None: when stderr is a terminal)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    if qtype not in TYPES:
        raise ValueError(f"unknown type {qtype!r}; one of {', '.join(TYPES)}")
    path = Path(path) if path is not None else default_path(shape, qtype, n_layers)
    if path.is_file():
        if not quiet:
            print(f"reusing {path} ({path.stat().st_size / 2**30:.2f} GiB)")
        return path
    from llama_min.files import atomic_write

    t0 = time.perf_counter()
    atomic_write(path, lambda tmp: write_random_gguf(Path(tmp), shape, qtype, n_layers, seed, progress))
    if not quiet:
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    return path


def main(argv=None) -> int:
    shapes = "; ".join(f"{k}: dim {s.dim}, {s.n_layers} layers, {s.n_heads} heads ({s.n_kv_heads} KV), FFN "
                       f"{s.ffn}, vocab {s.vocab}" for k, s in SHAPES.items())
    p = argparse.ArgumentParser(
        description="Write (once) a random-weight GGUF file of a real model shape into llama_min's asset cache "
                    "(cache_dir()/random/), with a real tokenizer, loadable by llama_min and llama.cpp. "
                    "A file already there is reused.",
        epilog=f"shapes: {shapes}. Types: q4_0, q4_1, q8_0 (every matrix), q4_k_m (llama.cpp's Q4_K_M recipe: "
               "Q4_K, output and some attn_v/ffn_down Q6_K). Needs the vocabulary files of "
               "`python -m llama_min.assets fetch`.")
    p.add_argument("--shape", required=True, choices=list(SHAPES), help="the model shape")
    p.add_argument("--type", required=True, choices=list(TYPES), dest="qtype", help="the quantization")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write it (default: <cache>/random/<shape>-<type>.gguf); reused if it exists")
    p.add_argument("--n-layers", type=int, default=None, help="fewer layers than the shape has (for tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random blocks (default 0)")
    p.add_argument("--force", action="store_true", help="rewrite the file even if it exists")
    a = p.parse_args(argv)
    if a.n_layers is not None and a.n_layers < 1:
        p.error("--n-layers must be >= 1")
    path = a.out if a.out is not None else default_path(a.shape, a.qtype, a.n_layers)
    if a.force and path.is_file():
        path.unlink()
    random_gguf(a.shape, a.qtype, path, n_layers=a.n_layers, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
