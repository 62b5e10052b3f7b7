"""A 4-bit matrix kernel for AVX2 CPUs (q4_avx2.c), compiled with the system's C compiler on first use.

Why it exists: decoding multiplies one activation row by every weight matrix, so it should run at memory
speed. PyTorch's 4-bit CPU kernel (`aten._weight_int4pack_mm_for_cpu`) has fast paths for AVX-512; on a
CPU with AVX2 only it is limited by arithmetic instead. On this project's AVX2 machine, one row times a
14336 x 4096 matrix took 4.2 ms through it (8.7 GB/s of 4-bit weights), 1.65 ms through q4_avx2.c
(22 GB/s, as fast as float32 weights stream: 11.7 ms for 4x the bytes). q4_avx2.c writes activations
as int16 per group of 32 (error at most 1.5e-5 of the group's largest value, against 2^-9 of every value
for the bf16 activations PyTorch's kernel takes) and keeps fp16 scales, so a Q4_0 / Q4_1 file's own
scale and offset are held exactly.

When it is used (quantize.int4_layout picks the 'avx2' layout): a CPU tensor, groups of 32, Linux on
x86-64, a CPU with avx2, fma and f16c, PyTorch's own kernels at their AVX2 level (on AVX-512 CPUs
PyTorch's are the fast ones), a C compiler (`$CC`, else `cc`), and `LLAMA_MIN_NATIVE` not set to 0.
Otherwise the layout falls back to PyTorch's kernel, with one line on stderr when a compiler was there
but the build failed. The built library is cached under the asset cache (`~/.cache/llama_min/native`),
named by a hash of the source and flags, written atomically.

`q4_linear(x, codes, dc)` is a PyTorch custom operator (torch.library), so `torch.compile` keeps it in
its graph as one call.
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

SOURCE = Path(__file__).with_name("q4_avx2.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = {"avx2", "fma", "f16c"}


def enabled() -> bool:
    """Whether the 'avx2' layout is used for new 4-bit layers (the kernel builds on first call)."""
    return os.environ.get("LLAMA_MIN_NATIVE", "1") != "0" and _library() is not None


def _cpu_supports() -> bool:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return CPU_FLAGS <= set(flags.split(":", 1)[1].split())


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
    from .assets import cache_dir

    try:
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
        out = cache_dir() / "native" / f"q4_avx2-{key}.so"
        error = None if out.exists() else _build(cc, out)
    except OSError as e:
        error = str(e)
    if error is not None:
        print(f"llama_min: could not build the AVX2 4-bit kernel ({error}); using PyTorch's", file=sys.stderr)
        return None
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.q4_linear.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
    lib.q4_linear.restype = ctypes.c_int
    lib.q4_dequantize.argtypes = [p, p, i64, i64, p, ctypes.c_int]
    lib.q4_dequantize.restype = None
    return lib


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
    (m, k), n = x.shape, codes.shape[0]
    if x.dtype != torch.float32 or codes.dtype != torch.uint8 or dc.dtype != torch.float16 or k % 32:
        raise ValueError(f"q4_linear: bad operands {x.dtype} {tuple(x.shape)}, {codes.dtype}, {dc.dtype}")
    if tuple(codes.shape) != (n, k // 2) or tuple(dc.shape) != (n, 2, k // 32):
        raise ValueError(f"q4_linear: shapes {tuple(codes.shape)}, {tuple(dc.shape)} do not fit K = {k}")
    codes, dc = codes.contiguous(), dc.contiguous()  # held here while the kernel reads them
    y = torch.empty(m, n, dtype=torch.float32)
    status = _library().q4_linear(x.data_ptr(), m, k, codes.data_ptr(), dc.data_ptr(), n, y.data_ptr(),
                                  torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"q4_linear: no memory for the int16 activations of {m} x {k}")
    return y


_q4_linear_op = torch.library.custom_op("llama_min::q4_linear", _q4_linear, mutates_args=())
_q4_linear_op.register_fake(lambda x, codes, dc: x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32))


def q4_dequantize(codes: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
    """The weights of q4_linear as float32 (N, K): d * q + c (what quantize.Int4Linear.dequantize computes)."""
    codes, dc = codes.contiguous(), dc.contiguous()
    n, k = codes.shape[0], codes.shape[1] * 2
    w = torch.empty(n, k, dtype=torch.float32)
    _library().q4_dequantize(codes.data_ptr(), dc.data_ptr(), n, k, w.data_ptr(), torch.get_num_threads())
    return w
