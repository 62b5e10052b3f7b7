"""llama_min's own matrix kernels for AVX2 CPUs (kernels_avx2.c), compiled with the system's C compiler on first use.

Why they exist: decoding multiplies one activation row by every weight matrix, so it should run at memory
speed. Measured on this project's 2-core AVX2 machine, in one script:

  - float32: PyTorch's CPU kernels (MKL, oneDNN) stream the short rows of a small model's matrices
    (576 or 1536 numbers in SmolLM2) at 10-15 GB/s; `f32_linear` streams them at 20-28 GB/s (one row times
    576 x 576: 75 us against 111 us in oneDNN's layout and 134 us in MKL; 576 x 1536: 149 against 235 and
    251 us). A whole float32 SmolLM2 decode step went from 20-22 to 28-30 tok/s with it. For one
    activation row, rows of at most 1024 weights are read one row at a time (a single sequential stream;
    kernels_avx2.c, SEQUENTIAL_MAX_K): on the AVX-512 machine below that took SmolLM2's float32 decode from
    44.5 to 57.3 tok/s. A few rows at once (a batch, a speculative check) read each block of 8 weight rows
    once from memory and from L1 for the other rows: 8 rows times SmolLM2's 49152 x 576 output cost 1.75x
    one row, where MKL's kernel cost 2.4x (2.5x already at 2 rows).
  - the norms and attention of a one-token step: a few dozen small PyTorch operations per layer, each
    costing microseconds of dispatch, become two calls (packed SmolLM2: 54-57 against 32-48 tok/s).
  - 4-bit: PyTorch's kernel (`aten._weight_int4pack_mm_for_cpu`) has fast paths for AVX-512; on a CPU with
    AVX2 only it is limited by arithmetic instead. One row times a 14336 x 4096 matrix took 4.2 ms through it
    (8.7 GB/s of 4-bit weights), 1.65 ms through `q4_linear` (22 GB/s, as fast as float32 weights stream:
    11.7 ms for 4x the bytes). `q4_linear` writes activations as int16 per group of 32 (error at most
    1.5e-5 of the group's largest value, against 2^-9 of every value for the bf16 activations PyTorch's
    kernel takes) and keeps fp16 scales, so a Q4_0 / Q4_1 file's own scale and offset are held exactly.
  - 8-bit: `q8_linear` (int8 weights times the same int16 activations, sums exact in int32): the default
    model's Q8_0 output layer took 1.6 ms a token against 3.6 ms through PyTorch's int8 kernel (one profile).
  - a GGUF file's own blocks (runtime/blocks.py): `block_linear` multiplies Q4_0 / Q4_1 / Q8_0 rows where the
    mapped file holds them (int16 activations, 25-27 GB/s for one row times a 5632 x 2048 Q4_0 matrix, near
    the machine's bandwidth), and, on CPUs with AVX-512 VNNI, Q4_0 / Q4_1 / Q8_0 / Q4_K regrouped into tiles of 8 rows
    (`q4x8_repack`) with activations as two int8 digits and vpdpbusd, one kernel for decoding and prompts:
    the 1.1B-shape Q4_0 model's 512-token prompt at 96 tok/s (73-77 through PyTorch's float32 GEMM on
    dequantized panels), decoding at 57-61 tok/s (45 from the mapped blocks).

On a CPU with AVX-512 (an AMD EPYC of the same 2-core kind, 2026-12-03), where PyTorch takes its AVX-512
paths, the AVX2 code is still the faster one (one script, 2 threads). One row times a matrix, PyTorch's
kernel (oneDNN's layout for float32) against llama_min's: float32 14336 x 4096 10.1 against 7.9 ms,
2048 x 5632 1.82 against 0.97 ms; 4-bit 14336 x 4096 1.97 against 1.22 ms, 4096 x 14336 2.16 against
2.12 ms; int8 5632 x 2048 396 against 265 us, 4096 x 14336 2.45 against 2.21 ms (3.17 ms before its
long rows prefetched into L2 only, kernels_avx2.c). Whole SmolLM2 decode steps: 1.7-1.9x (float32),
3.3-3.7x (int8), 2.7-3.4x (int4).

When they are used (`enabled()`): Linux on x86-64, a CPU with avx2, fma and f16c (AVX-512 or not), a C
compiler (`$CC`, else `cc`), and `LLAMA_MIN_NATIVE` not set to 0. Then float32 CPU models decode through
`f32_linear` (linear.NativeLinear), 4-bit layers of group size 32 use the 'avx2' layout
(int4_layouts.int4_layout), int8 layers `q8_linear`, and models with float32 activations run their norms,
one-token attention and SwiGLU through `rms_norm`, `decode_attention` and `swiglu`
(native_decode.use_native_decode). Otherwise all fall back to PyTorch's operations, with one line on stderr when a
compiler was there but the build failed. The built library is cached
under the asset cache (`~/.cache/llama_min/native`), named by a hash of the source and flags, written
atomically. Prompts of many rows (linear.PREFILL_ROWS, 32, or more) keep PyTorch's matrix-matrix kernels,
which are faster there: oneDNN's on the dense float32 weight (linear.prompt_linear; it reorders the weight on
each call and still beat MKL on SmolLM2's wide matrices, 18 against 29 ms for 512 rows times 3072 x 576), MKL's
where rows are longer than 1536 (25 against 52-60 ms for 512 rows times 2048 x 2048); 4-bit and int8 layers
dequantize a panel of rows at a time (`q4_dequantize`, linear.prompt_by_panels) for float products: the
whole matrix dequantized at once took the 1.1B-shape Q4_0 prompt to 34 tok/s, panels of 2-4 MiB to 69
(still in the cache when the GEMM reads them; no float copy of the matrix held). The tiled Q4 layers
(blocks.TiledLinear) take their own integer kernel for prompts too.

`f32_linear(x, w)`, `q4_linear(x, codes, dc)` and `q8_linear(x, w, scales)` are PyTorch custom operators
(torch.library), so `torch.compile` keeps each in its graph as one call. `rms_norm`, `swiglu` and
`decode_attention` are eager only (a compiled step generates its own code for them). `decode_layers` runs
a whole decode step through every decoder layer in one call with the functions above (runtime/step.py says
when and why); `decode_rows` is the same step with each row at a position of its own (a server's rows). `torch.compile` leaves the steps it takes to it, because it decoded faster than the compiled
graph: alternating in one script on the AVX2 machine, packed SmolLM2 54.7-69.0 tok/s against 35.7-40.6
through the graph, float32 26.1-28.9 against 18.5-21.2, the same tokens.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ...files.gguf import GGML_BLOCKS

SOURCE = Path(__file__).with_name("kernels_avx2.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = {"avx2", "fma", "f16c"}


def enabled() -> bool:
    """Whether the 'avx2' layout is used for new 4-bit layers (the kernel builds on first call)."""
    return os.environ.get("LLAMA_MIN_NATIVE", "1") != "0" and _library() is not None


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty off Linux x86-64)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(flags.split(":", 1)[1].split())


def _cpu_supports() -> bool:
    return CPU_FLAGS <= _cpu_flags()


VNNI_FLAGS = {"avx512_vnni", "avx512vl", "avx512bw", "avx512f"}


def vnni() -> bool:
    """Whether Q4_0 / Q4_1 files load into the tiled layout (tiled_linear: AVX-512 VNNI integer products for
    decoding and prompts alike); LLAMA_MIN_VNNI=0 keeps them as stored (block_linear, float prompts)."""
    return enabled() and VNNI_FLAGS <= _cpu_flags() and os.environ.get("LLAMA_MIN_VNNI", "1") != "0"


def _build(cc: str, out: Path) -> Optional[str]:
    """Compile SOURCE into `out` (atomically); None on success, else the compiler's first error line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if run.returncode != 0:
            lines = [line for line in run.stderr.splitlines() if "error" in line] or run.stderr.splitlines()
            return lines[0] if lines else f"exit status {run.returncode}"
        os.replace(tmp, out)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _library():
    """The loaded kernel (ctypes), or None where it cannot be used (see the module docstring)."""
    if not _cpu_supports():
        return None
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        return None
    from ...assets import cache_dir

    try:
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
        out = cache_dir() / "native" / f"kernels_avx2-{key}.so"
        error = None if out.exists() else _build(cc, out)
    except OSError as e:
        error = str(e)
    if error is not None:
        print(f"llama_min: could not build the AVX2 kernels ({error}); using PyTorch's", file=sys.stderr)
        return None
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.q4_linear.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
    lib.q4_linear.restype = ctypes.c_int
    lib.q4_dequantize.argtypes = [p, p, i64, i64, p, ctypes.c_int]
    lib.q4_dequantize.restype = None
    lib.f32_linear.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    lib.f32_linear.restype = None
    lib.q8_linear.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
    lib.q8_linear.restype = ctypes.c_int
    lib.block_linear.argtypes = [p, i64, i64, i64, p, i64, p, ctypes.c_int]
    lib.block_linear.restype = ctypes.c_int
    lib.block_dequantize.argtypes = [i64, p, i64, i64, p, i64, p, ctypes.c_int]
    lib.block_dequantize.restype = None
    lib.q4x8_repack.argtypes = [p, i64, i64, i64, p, ctypes.c_int]
    lib.q4x8_repack.restype = None
    lib.q8x8_repack.argtypes = [p, i64, i64, p, ctypes.c_int]
    lib.q8x8_repack.restype = None
    lib.q4kx8_repack.argtypes = [p, i64, i64, p, ctypes.c_int]
    lib.q4kx8_repack.restype = None
    lib.q6kx8_repack.argtypes = [p, i64, i64, p, ctypes.c_int]
    lib.q6kx8_repack.restype = None
    lib.q4k_to_avx2.argtypes = [p, i64, i64, p, p, ctypes.c_int]
    lib.q4k_to_avx2.restype = None
    lib.q6k_to_int8.argtypes = [p, i64, i64, p, p, ctypes.c_int]
    lib.q6k_to_int8.restype = ctypes.c_int
    lib.rms_norm.argtypes = [p, i64, i64, p, ctypes.c_float, p]
    lib.rms_norm.restype = None
    lib.swiglu.argtypes = [p, i64, i64, p, ctypes.c_int]
    lib.swiglu.restype = None
    lib.decode_attention.argtypes = [p, p, p, i64, i64, i64, i64, i64, p, i64, p, p, i64, p, ctypes.c_int]
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_layers.argtypes = [p, i64, p, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float, p, i64, p, i64,
                                  ctypes.c_int]
    lib.decode_layers.restype = ctypes.c_int
    return lib


def f32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32, w (N, K) float32 -> x w^T (M, N) float32, for a few rows M (see kernels_avx2.c).

    Called directly when eager (see q4_linear), inside torch.compile as `torch.ops.llama_min.f32_linear`.
    """
    if torch.compiler.is_compiling():
        return torch.ops.llama_min.f32_linear(x, w)
    return _f32_linear(x, w)


def _f32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x, w = x.contiguous(), w.contiguous()
    (m, k), n = x.shape, w.shape[0]
    if x.dtype != torch.float32 or w.dtype != torch.float32 or tuple(w.shape) != (n, k) or x.device.type != "cpu":
        raise ValueError(f"f32_linear: bad operands {x.dtype} {tuple(x.shape)}, {w.dtype} {tuple(w.shape)}")
    y = torch.empty(m, n, dtype=torch.float32)
    _library().f32_linear(x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    return y


_f32_linear_op = torch.library.custom_op("llama_min::f32_linear", _f32_linear, mutates_args=())
_f32_linear_op.register_fake(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))


def q4_linear(x: torch.Tensor, codes: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32, codes (N, K/2) uint8, dc (N, 2, K/32) fp16 (scales, mins) -> x W^T (M, N) float32.

    Called directly when eager (a custom operator's dispatch costs 10-25 us a call, as much as a small
    layer's product); inside torch.compile through the operator `torch.ops.llama_min.q4_linear`.
    """
    if torch.compiler.is_compiling():
        return torch.ops.llama_min.q4_linear(x, codes, dc)
    return _q4_linear(x, codes, dc)


def _q4_linear(x: torch.Tensor, codes: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    (_, k), n = x.shape, codes.shape[0]
    if x.dtype != torch.float32 or codes.dtype != torch.uint8 or dc.dtype != torch.float16 or k % 32:
        raise ValueError(f"q4_linear: bad operands {x.dtype} {tuple(x.shape)}, {codes.dtype}, {dc.dtype}")
    if tuple(codes.shape) != (n, k // 2) or tuple(dc.shape) != (n, 2, k // 32):
        raise ValueError(f"q4_linear: shapes {tuple(codes.shape)}, {tuple(dc.shape)} do not fit K = {k}")
    codes, dc = codes.contiguous(), dc.contiguous()  # held here while the kernel reads them
    return _quantized_product(_library().q4_linear, "q4_linear", x, codes, dc, n)


_q4_linear_op = torch.library.custom_op("llama_min::q4_linear", _q4_linear, mutates_args=())
_q4_linear_op.register_fake(lambda x, codes, dc: x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32))


def q8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32, w (N, K) int8, scales (N,) float32 -> (x w^T) * scales (M, N) float32; K % 32 == 0.

    The activations are written as int16 per group of 32, as in q4_linear (PyTorch's int8 kernel takes them
    as bf16). Called directly when eager, inside torch.compile as `torch.ops.llama_min.q8_linear`.
    """
    if torch.compiler.is_compiling():
        return torch.ops.llama_min.q8_linear(x, w, scales)
    return _q8_linear(x, w, scales)


def _q8_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    x, w, scales = x.contiguous(), w.contiguous(), scales.contiguous()
    (_, k), n = x.shape, w.shape[0]
    if (x.dtype != torch.float32 or w.dtype != torch.int8 or scales.dtype != torch.float32 or k % 32
            or tuple(w.shape) != (n, k) or tuple(scales.shape) != (n,)):
        raise ValueError(f"q8_linear: bad operands {x.dtype} {tuple(x.shape)}, {w.dtype} {tuple(w.shape)}, "
                         f"{scales.dtype} {tuple(scales.shape)}")
    return _quantized_product(_library().q8_linear, "q8_linear", x, w, scales, n)


def _quantized_product(kernel, name: str, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int):
    """y (M, n) = kernel(x (M, K), w, scales): q4_linear and q8_linear take the same arguments in C (checked
    operands, contiguous); the kernel returns nonzero when it had no memory for the int16 activations."""
    (m, k), y = x.shape, torch.empty(x.shape[0], n, dtype=torch.float32)
    if kernel(x.data_ptr(), m, k, w.data_ptr(), scales.data_ptr(), n, y.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError(f"{name}: no memory for the int16 activations of {m} x {k}")
    return y


_q8_linear_op = torch.library.custom_op("llama_min::q8_linear", _q8_linear, mutates_args=())
_q8_linear_op.register_fake(lambda x, w, scales: x.new_empty(x.shape[0], w.shape[0]))


# ggml block types the C code multiplies by where the file holds them: type -> (matrix kind, bytes per block of 32)
BLOCK_TYPES = {"Q4_0": (3, 18), "Q4_1": (4, 20), "Q8_0": (5, 34)}


def _block_rows(src: torch.Tensor, k: int, per_block: int, block_bytes: int, name: str) -> int:
    """The number of rows of `src`, rows of K / per_block blocks of block_bytes (uint8, contiguous, CPU), checked."""
    if (src.dtype != torch.uint8 or src.dim() != 2 or k % per_block or src.shape[1] != k // per_block * block_bytes
            or not src.is_contiguous() or src.device.type != "cpu"):
        raise ValueError(f"{name}: bad operand {src.dtype} {tuple(src.shape)} for K = {k}")
    return src.shape[0]


def ggml_rows(src: torch.Tensor, ggml_type: str, k: int, name: str) -> int:
    """The number of rows of `src`, rows of K weights in `ggml_type`'s blocks (files.gguf.GGML_BLOCKS), checked."""
    return _block_rows(src, k, *GGML_BLOCKS[ggml_type], name)


def check_blocks(blocks: torch.Tensor, ggml_type: str, k: int) -> int:
    """The matrix kind of `blocks` (N, K/32 * block bytes) uint8 rows of `ggml_type`, checked."""
    ggml_rows(blocks, ggml_type, k, f"{ggml_type} blocks")
    return BLOCK_TYPES[ggml_type][0]


def _block_product(x: torch.Tensor, kind: int, w: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """y (M, n) = x (M, K) W^T through kernels_avx2.c's block_linear, W of matrix kind `kind` (checked)."""
    (m, k) = x.shape
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{name}: bad activations {x.dtype} {tuple(x.shape)}")
    y = torch.empty(m, n, dtype=torch.float32)
    if _library().block_linear(x.data_ptr(), m, k, kind, w.data_ptr(), n, y.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"{name}: no memory for the quantized activations of {m} x {k}")
    return y


def block_linear(x: torch.Tensor, blocks: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """x (M, K) float32 times W^T, W held as ggml blocks (N, K/32 * block bytes) uint8 of `ggml_type` (Q4_0,
    Q4_1 or Q8_0: kernels_avx2.c reads them in place) -> (M, N) float32; for a few rows M."""
    x = x.contiguous()
    kind = check_blocks(blocks, ggml_type, x.shape[1])
    return _block_product(x, kind, blocks, blocks.shape[0], "block_linear")


# type -> (matrix kind, bytes a tile of 8 rows takes per 32 weights of K): the file's bytes for 8 rows, and for
# Q4_K 148 against the file's 144 (its 6-bit sub-block scales and mins laid out one byte each)
TILED_TYPES = {"Q4_0": (6, 144), "Q4_1": (7, 160), "Q8_0": (8, 272), "Q4_K": (9, 148), "Q6_K": (10, 210)}


def tiled_bytes(ggml_type: str, n: int, k: int) -> int:
    """Bytes of an (n, k) matrix of `ggml_type` in the tiled layout: whole tiles of 8 rows, the file's size when
    8 divides n (Q4_K: 148/144 of it)."""
    return (n + 7) // 8 * (k // 32) * TILED_TYPES[ggml_type][1]


def _tiles_out(blocks: torch.Tensor, ggml_type: str, k: int, out: torch.Tensor, name: str) -> int:
    """The number of rows of `blocks`, checked, and `out` checked to hold them tiled."""
    n = ggml_rows(blocks, ggml_type, k, f"{ggml_type} blocks")
    if out.dtype != torch.uint8 or out.numel() != tiled_bytes(ggml_type, n, k) or not out.is_contiguous():
        raise ValueError(f"{name}: out {out.dtype} {tuple(out.shape)} does not hold {n} x {k} {ggml_type}")
    return n


def q4x8_repack(blocks: torch.Tensor, ggml_type: str, k: int, out: torch.Tensor) -> torch.Tensor:
    """Q4_0 / Q4_1 rows (n, K/32 * block bytes) -> the tiled layout (kernels_avx2.c, q4x8_repack) in `out`, a
    uint8 tensor of tiled_bytes(ggml_type, n, k). n a multiple of 8 unless these are the matrix's last rows."""
    n = _tiles_out(blocks, ggml_type, k, out, "q4x8_repack")
    _library().q4x8_repack(blocks.data_ptr(), n, k, TILED_TYPES[ggml_type][0], out.data_ptr(), torch.get_num_threads())
    return out


def q8x8_repack(blocks: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Q8_0 rows (n, K/32 * 34) -> Q8_0's tiled layout (kernels_avx2.c, q8x8_repack) in `out`, as q4x8_repack."""
    n = _tiles_out(blocks, "Q8_0", k, out, "q8x8_repack")
    _library().q8x8_repack(blocks.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def q4kx8_repack(blocks: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Q4_K rows (n, K/256 * 144) -> Q4_K's tiled layout (kernels_avx2.c, q4kx8_repack) in `out`, as q4x8_repack."""
    n = _tiles_out(blocks, "Q4_K", k, out, "q4kx8_repack")
    _library().q4kx8_repack(blocks.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def q6kx8_repack(blocks: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Q6_K rows (n, K/256 * 210) -> Q6_K's tiled layout (kernels_avx2.c, q6kx8_repack) in `out`, as q4x8_repack."""
    n = _tiles_out(blocks, "Q6_K", k, out, "q6kx8_repack")
    _library().q6kx8_repack(blocks.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return out


def tile_blocks(blocks: torch.Tensor, ggml_type: str, k: int, out: torch.Tensor) -> torch.Tensor:
    """Rows of blocks of any TILED_TYPES type -> its tiled layout in `out`: q8x8_repack for Q8_0, q4kx8_repack for
    Q4_K, q6kx8_repack for Q6_K, else q4x8_repack."""
    repack = {"Q8_0": q8x8_repack, "Q4_K": q4kx8_repack, "Q6_K": q6kx8_repack}.get(ggml_type)
    return repack(blocks, k, out) if repack is not None else q4x8_repack(blocks, ggml_type, k, out)


def check_tiles(tiles: torch.Tensor, ggml_type: str, n: int, k: int) -> int:
    """The matrix kind of an (n, k) matrix of `ggml_type` in the tiled layout held by `tiles`, checked."""
    if (ggml_type not in TILED_TYPES or k % GGML_BLOCKS[ggml_type][0] or tiles.dtype != torch.uint8 or not tiles.is_contiguous()
            or tiles.device.type != "cpu" or tiles.numel() != tiled_bytes(ggml_type, n, k)):
        raise ValueError(f"{ggml_type} tiles: {tiles.numel()} bytes ({tiles.dtype}) do not hold {n} x {k}")
    return TILED_TYPES[ggml_type][0]


def tiled_linear(x: torch.Tensor, tiles: torch.Tensor, ggml_type: str, n: int) -> torch.Tensor:
    """x (M, K) float32 times W^T, W (n, K) a Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K matrix in the tiled layout, any number of rows M:
    activations as two int8 digits per block of 32, AVX-512 VNNI integer products (only where vnni())."""
    x = x.contiguous()
    return _block_product(x, check_tiles(tiles, ggml_type, n, x.shape[1]), tiles, n, "tiled_linear")


def block_dequantize(blocks: torch.Tensor, ggml_type: str, k: int, rows: Optional[torch.Tensor] = None,
                     start: int = 0, count: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weights of ggml block rows as float32 (n, K): rows start .. start+count-1 (count None: to the end),
    or the rows listed in `rows` (an int64 tensor; an embedding's lookup). Each weight exactly as the gguf
    package computes it. `out`: a float32 (n, K) buffer to write into."""
    kind = check_blocks(blocks, ggml_type, k)
    if rows is not None:
        rows = rows.reshape(-1).to(torch.int64).contiguous()
        n = rows.numel()
        if n and (int(rows.min()) < 0 or int(rows.max()) >= blocks.shape[0]):
            raise IndexError(f"block rows {int(rows.min())}..{int(rows.max())} outside 0..{blocks.shape[0] - 1}")
    else:
        n = blocks.shape[0] - start if count is None else count
        if start < 0 or n < 0 or start + n > blocks.shape[0]:
            raise IndexError(f"block rows {start}..{start + n - 1} outside 0..{blocks.shape[0] - 1}")
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    elif out.dtype != torch.float32 or tuple(out.shape) != (n, k) or not out.is_contiguous():
        raise ValueError(f"block_dequantize: out {out.dtype} {tuple(out.shape)} is not float32 ({n}, {k})")
    _library().block_dequantize(kind, blocks.data_ptr(), k, start, None if rows is None else rows.data_ptr(), n,
                                out.data_ptr(), torch.get_num_threads())
    return out


def q4k_to_avx2(src: torch.Tensor, k: int, codes: torch.Tensor, dc: torch.Tensor) -> None:
    """Q4_K rows (n, K/256 * 144) uint8 -> the 'avx2' 4-bit layout, written into codes (n, K/2) uint8 and dc
    (n, 2, K/32) fp16 (scales d*sc, then mins -dmin*mn, each rounded to fp16; kernels_avx2.c)."""
    n = ggml_rows(src, "Q4_K", k, "q4k_to_avx2")
    if (codes.dtype != torch.uint8 or tuple(codes.shape) != (n, k // 2) or not codes.is_contiguous()
            or dc.dtype != torch.float16 or tuple(dc.shape) != (n, 2, k // 32) or not dc.is_contiguous()):
        raise ValueError(f"q4k_to_avx2: outputs {tuple(codes.shape)} {tuple(dc.shape)} do not fit {n} x {k}")
    _library().q4k_to_avx2(src.data_ptr(), n, k, codes.data_ptr(), dc.data_ptr(), torch.get_num_threads())


def q6k_to_int8(src: torch.Tensor, k: int, q: torch.Tensor, scales: torch.Tensor) -> None:
    """Q6_K rows (n, K/256 * 210) uint8 -> int8 per row, written into q (n, K) int8 and scales (n,) float32:
    each row dequantized, then quantized as quantize.quantize_per_channel does (kernels_avx2.c)."""
    n = ggml_rows(src, "Q6_K", k, "q6k_to_int8")
    if (q.dtype != torch.int8 or tuple(q.shape) != (n, k) or not q.is_contiguous() or scales.dtype != torch.float32
            or tuple(scales.shape) != (n,) or not scales.is_contiguous()):
        raise ValueError(f"q6k_to_int8: outputs {tuple(q.shape)} {tuple(scales.shape)} do not fit {n} x {k}")
    if _library().q6k_to_int8(src.data_ptr(), n, k, q.data_ptr(), scales.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"q6k_to_int8: no memory for a row of {k} floats per thread")


def q4_dequantize(codes: torch.Tensor, dc: torch.Tensor, start: int = 0, count: Optional[int] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weights of q4_linear as float32 (n, K): d * q + c (what quantize.Int4Linear.dequantize computes), of
    rows start .. start+count-1 (count None: to the end), into `out` (a float32 (n, K) buffer) if given."""
    codes, dc = codes.contiguous(), dc.contiguous()
    k = codes.shape[1] * 2
    n = codes.shape[0] - start if count is None else count
    if start < 0 or n < 0 or start + n > codes.shape[0]:
        raise IndexError(f"q4_dequantize: rows {start}..{start + n - 1} outside 0..{codes.shape[0] - 1}")
    w = torch.empty(n, k, dtype=torch.float32) if out is None else out
    if w.dtype != torch.float32 or tuple(w.shape) != (n, k) or not w.is_contiguous():
        raise ValueError(f"q4_dequantize: out {w.dtype} {tuple(w.shape)} is not float32 ({n}, {k})")
    first_codes = codes.data_ptr() + start * codes.stride(0)  # uint8: one byte per element
    first_dc = dc.data_ptr() + start * dc.stride(0) * dc.element_size()
    _library().q4_dequantize(first_codes, first_dc, n, k, w.data_ptr(), torch.get_num_threads())
    return w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.py's RMSNorm of float32 x (..., D) in one call: x / sqrt(mean(x^2) + eps) * weight."""
    x = x.contiguous()
    d = x.shape[-1]
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or tuple(weight.shape) != (d,)
            or not weight.is_contiguous() or x.device.type != "cpu" or weight.device.type != "cpu"):
        raise ValueError(f"rms_norm: bad operands {x.dtype} {tuple(x.shape)}, {weight.dtype} {tuple(weight.shape)}")
    out = torch.empty_like(x)
    _library().rms_norm(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), eps, out.data_ptr())
    return out


def swiglu(gate_up: torch.Tensor, hidden: int) -> torch.Tensor:
    """silu(gate) * up in one pass, for float32 gate_up (..., 2 * hidden) = [gate | up] (a fused gate|up
    product's output). Returns (..., hidden); silu(g) = g / (1 + e^-g)."""
    gate_up = gate_up.contiguous()
    if (gate_up.dtype != torch.float32 or gate_up.device.type != "cpu" or gate_up.shape[-1] != 2 * hidden):
        raise ValueError(f"swiglu: bad operand {gate_up.dtype} {tuple(gate_up.shape)} for hidden size {hidden}")
    out = gate_up.new_empty(*gate_up.shape[:-1], hidden)
    _library().swiglu(gate_up.data_ptr(), gate_up.numel() // (2 * hidden), hidden, out.data_ptr(),
                      torch.get_num_threads())
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs_row: torch.Tensor, pos: int,
                     k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One new token per row, in one call: RoPE on q (B, 1, H, hd) and k (B, 1, K, hd), k and v written to the
    caches (B_cache, S, K, hd) at `pos`, then every query head attends over positions 0..pos of its KV head.

    freqs_row: the complex freqs_cis row of `pos`, (1, hd/2). Returns (B, H * hd) float32: what
    model.py's Attention computes before its output projection. q, k, v may be views of one fused row.
    """
    B, _, H, hd = q.shape
    K, S = k.shape[2], k_cache.shape[1]
    stride = q.stride(0) if B > 1 else 0  # (a size-1 dimension's stride means nothing)
    tensors = (q, k, v, k_cache, v_cache)
    fits = (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and q.shape[1] == 1
            and all(t.stride(-1) == 1 and t.stride(-2) == hd and (B == 1 or t.stride(0) == stride) for t in (q, k, v))
            and tuple(k_cache.shape[2:]) == (K, hd) and k_cache.shape == v_cache.shape and k_cache.shape[0] >= B
            and k_cache.is_contiguous() and v_cache.is_contiguous() and 0 <= pos < S and H % K == 0
            and freqs_row.dtype == torch.complex64 and freqs_row.device.type == "cpu" and freqs_row.numel() == hd // 2)
    if not fits:
        raise ValueError("decode_attention: operands do not fit one new token per row and a (B, S, K, hd) cache")
    cs = torch.view_as_real(freqs_row.reshape(-1)).contiguous()  # (hd/2, 2): cos, sin of each pair
    out = torch.empty(B, H * hd, dtype=torch.float32)
    status = _library().decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), stride, B, H, K, hd, cs.data_ptr(),
                                         pos, k_cache.data_ptr(), v_cache.data_ptr(), S, out.data_ptr(),
                                         torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"decode_attention: no memory for the scores of {pos + 1} positions")
    return out


# ------------------------------------------------------------------------------------------------
# A whole decode step through the decoder layers (decode_layers in kernels_avx2.c; step.NativeStep)
# ------------------------------------------------------------------------------------------------

FLOAT32, INT4, INT8 = 0, 1, 2  # matrix kinds, as kernels_avx2.c numbers them (3, 4, 5: BLOCK_TYPES)


class Matrix(ctypes.Structure):
    """One weight matrix for decode_layers: kind, N, K, the weight's data and its scales' (see the C struct)."""

    _fields_ = [("kind", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    """One decoder layer for decode_layers: its norms' weights, matrices and KV cache."""

    _fields_ = [("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("n_qkv", ctypes.c_int64), ("n_up", ctypes.c_int64),
                ("qkv", Matrix * 3), ("wo", Matrix), ("up", Matrix * 2), ("w2", Matrix),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


def decode_layers(layers, h: torch.Tensor, T: int, dims: tuple, eps: float, freqs_rows: torch.Tensor, pos: int,
                  S: int) -> torch.Tensor:
    """h (B*T, D) float32: T new tokens per row at positions pos .. pos+T-1 (row b's tokens are rows b*T ..
    b*T+T-1), through every layer described by `layers` (a ctypes array of Layer; the caller checked every
    pointer in it), in place. dims: (H, KV, hd, F); freqs_rows: the complex freqs_cis rows (T, hd/2)."""
    M, D = h.shape
    if (h.dtype != torch.float32 or not h.is_contiguous() or h.device.type != "cpu" or T < 1 or M % T
            or pos < 0 or pos + T > S):
        raise ValueError(f"decode_layers: bad operands {h.dtype} {tuple(h.shape)}, {T} tokens at {pos} of {S}")
    H, KV, hd, F = dims
    if freqs_rows.dtype != torch.complex64 or tuple(freqs_rows.shape) != (T, hd // 2):
        raise ValueError("decode_layers: the freqs_cis rows do not fit the tokens and the head size")
    cs = torch.view_as_real(freqs_rows).contiguous()  # (T, hd/2, 2): cos, sin of each pair
    return _decode_layers(layers, h, T, dims, eps, cs, pos, None, S)


def decode_rows(layers, h: torch.Tensor, dims: tuple, eps: float, freqs_rows: torch.Tensor, positions: torch.Tensor,
                S: int) -> torch.Tensor:
    """decode_layers for one new token per row, each row at its own position: h (B, D) float32, row b's token
    at positions[b] (B,), an int64 CPU tensor, with freqs_rows[b] (B, hd/2) the complex freqs_cis row of
    that position. Row b writes its key and value to row b of each layer's cache at positions[b] and
    attends over that row's positions 0 .. positions[b] (a server's rows, each with its own length)."""
    B, D = h.shape
    H, KV, hd, F = dims
    if h.dtype != torch.float32 or not h.is_contiguous() or h.device.type != "cpu":
        raise ValueError(f"decode_rows: bad activations {h.dtype} {tuple(h.shape)}")
    if positions.dtype != torch.int64 or tuple(positions.shape) != (B,) or positions.device.type != "cpu":
        raise ValueError(f"decode_rows: positions {positions.dtype} {tuple(positions.shape)}, not {B} int64")
    if B and (int(positions.min()) < 0 or int(positions.max()) >= S):
        raise ValueError(f"decode_rows: positions {positions.tolist()} do not fit a cache of {S}")
    if freqs_rows.dtype != torch.complex64 or tuple(freqs_rows.shape) != (B, hd // 2):
        raise ValueError("decode_rows: the freqs_cis rows do not fit the rows and the head size")
    cs = torch.view_as_real(freqs_rows).contiguous()  # (B, hd/2, 2): cos, sin of each row's pairs
    return _decode_layers(layers, h, 1, dims, eps, cs, 0, positions.contiguous(), S)


def _decode_layers(layers, h, T, dims, eps, cs, pos, starts, S):
    """The C call (checked operands): every row at pos (starts None), or row b at starts[b]."""
    M, D = h.shape
    H, KV, hd, F = dims
    starts_ptr = None if starts is None else starts.data_ptr()
    status = _library().decode_layers(layers, len(layers), h.data_ptr(), M // T, T, D, H, KV, hd, F, eps,
                                      cs.data_ptr(), pos, starts_ptr, S, torch.get_num_threads())
    if status != 0:
        raise MemoryError("decode_layers: no memory for a step's activations")
    return h
