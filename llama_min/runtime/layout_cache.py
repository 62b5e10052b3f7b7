"""Converted layouts of a GGUF file's matrices kept on disk, so that the next load maps them instead of converting.

A packed load regroups Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K matrices into tiles (AVX-512 VNNI; without it, the
K-quants are converted; runtime/packed.py). The conversion is quick; what costs is the fresh memory it writes
into: the kernel zeroes every new page, and on
this project's 2-core machine building the 1.1B-shape Q4_0 model's 590 MiB of tiles took ~0.4 s, against
~0.04 s to map the same bytes from a file the OS already holds in its page cache. An 8B Q4_K_M file converted
for 10-13 s. So after converting, the loader writes what it made to one file, and the next load of the same
GGUF file maps that file instead (copy-on-write: the model's tensors are views of it, as Q8_0 blocks are views
of the GGUF file).

Where:     <cache folder>/layouts/<hash of the GGUF file's full path>.safetensors, one per GGUF file (a
           changed file's layout replaces the old one). The cache folder is $LLAMA_MIN_CACHE or
           ~/.cache/llama_min. The layout takes about the file's size on disk.
Format:    safetensors (8-byte little-endian header length, a JSON header, the tensors' bytes), written
           tensor by tensor from the built model (no second copy in memory), to a temp name then renamed.
           Tensor names are "<GGUF tensor name>@<conversion>/<part>", e.g. "blk.0.attn_q.weight@tiles
           Q4_0/tiles"; the header's metadata holds the key below.
Key:       LAYOUT_VERSION, the GGUF file's path, size and modification time (ns), a hash of its tensor table
           (names, types, shapes, offsets) and of the first and last 4 KiB of every tensor's bytes; each
           tensor's conversion (which depends on the CPU) is in its name. A layout whose key differs from the
           file's is never read: the file is converted again and the layout rewritten. (A file rewritten in
           place keeping its size, its modification time to the nanosecond, its tensor table and the sampled
           bytes would not be noticed; replacing a file by a download or a copy changes its mtime.)
Off:       Llama.build(layout_cache=False), `--no-layout-cache` on the command line, or the environment
           variable LLAMA_MIN_LAYOUT_CACHE=0. Errors writing it (a read-only or full disk) cost only the
           cache: one warning line, and the model runs from memory.
Written:   in a thread of its own once the model is built (the model runs meanwhile; the process waits for it at
           exit, and the command line says so; a Ctrl-C gives it up). When a layout is written, layouts of GGUF files that no longer exist are deleted, and so
           are temp files a killed writer left behind an hour or more ago.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import mmap
import os
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

LAYOUT_VERSION = 1  # bump when a conversion or a tiled layout changes: older layouts are then never read
SAMPLE = 4096  # bytes hashed at each end of every tensor
ALIGN = 64  # the data section starts at a multiple of this (the header is padded with spaces)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # (Linux 5.14; Python's mmap names it from 3.12)
DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
Parts = Dict[str, torch.Tensor]


def enabled(asked: bool = True) -> bool:
    """Whether layouts are cached: asked (Llama.build's layout_cache) and not LLAMA_MIN_LAYOUT_CACHE=0."""
    return asked and os.environ.get("LLAMA_MIN_LAYOUT_CACHE", "1").strip().lower() not in ("0", "off", "no", "false")


def folder() -> Path:
    from ..assets import cache_dir

    return cache_dir() / "layouts"


def layout_path(gguf_path) -> Path:
    """Where the layout of `gguf_path` lives: one file per GGUF file, named by a hash of its full path."""
    full = str(Path(gguf_path).resolve())
    return folder() / f"{hashlib.sha256(full.encode()).hexdigest()[:24]}.safetensors"


def file_key(gguf_path, tensors) -> dict:
    """The key a layout must match: the file's identity and a fingerprint of its contents (module docstring).
    tensors: the loader's GGUFTensor objects (name, type, shape, offset, nbytes, buf)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.name}|{t.type_name}|{t.shape}|{t.offset}|{t.nbytes}\n".encode())
        h.update(t.buf[t.offset : t.offset + min(SAMPLE, t.nbytes)])
        h.update(t.buf[max(t.offset, t.offset + t.nbytes - SAMPLE) : t.offset + t.nbytes])
    return {"version": str(LAYOUT_VERSION), "source": str(path), "size": str(stat.st_size),
            "mtime_ns": str(stat.st_mtime_ns), "contents": h.hexdigest()}


class LayoutCache:
    """The cached layouts of one GGUF file for one load: `parts(name, how, make)` returns the tensors make()
    converts tensor `name` into (`how` names the conversion), from the layout file when it holds them under
    the same key, else from make() (and remembered); `save()` writes the layout file if anything was made or left unused."""

    def __init__(self, gguf_path, key: dict):
        self.path, self.key = layout_path(gguf_path), key
        self.found: Dict[str, Parts] = {}  # "<tensor>@<how>" -> parts, views of the mapped layout file
        self.spans: Dict[str, list] = {}  # "<tensor>@<how>" -> [(byte offset, length)] of its parts in the mapping
        self.used: Dict[str, Parts] = {}  # what this load asked for, found or made: what save() writes
        self.buf = None
        self._read()

    def _read(self):
        try:
            with open(self.path, "rb") as f:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable views; the file never written
            header, start = read_header(buf)
        except (OSError, ValueError):  # none yet, empty or malformed: converted again and rewritten
            return
        meta = header.pop("__metadata__", {})
        if any(meta.get(k) != v for k, v in self.key.items()):
            return  # another version of the file (or of the layouts): never read
        for entry, info in header.items():
            which, _, part = entry.rpartition("/")
            lo, hi = info["data_offsets"]
            dtype = TORCH_DTYPES[info["dtype"]]
            if (start + lo) % dtype.itemsize:
                return
            t = torch.frombuffer(buf, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=start + lo)
            self.found.setdefault(which, {})[part] = t.view(info["shape"])
            self.spans.setdefault(which, []).append((start + lo, hi - lo))
        self.buf = buf

    def parts(self, name: str, how: str, make: Callable[[], Parts]) -> Parts:
        """The parts of tensor `name` converted as `how`: mapped from the layout (only what is used is read in:
        a layout of another conversion, e.g. of an older llama_min, costs no memory), else made now."""
        which = f"{name}@{how}"
        if which in self.found:
            for offset, length in self.spans[which]:
                _populate(self.buf, offset, length)
            self.used[which] = self.found[which]
        else:
            self.used[which] = make()
        return self.used[which]

    def save(self) -> Optional[threading.Thread]:
        """Write the layout file when this load converted anything or left some of it unused (exactly what this
        load used, found or made: a layout holds nothing that is not mapped into the model, since mapping it
        all counts in resident memory), in a thread of its own: the model runs meanwhile. Writing 4.2 GB (the 8B shape's Q4_0 tiles)
        takes the OS ~8-16 s once its page cache holds more unwritten data than it allows; the thread keeps
        that out of the start. Python waits for it at exit (wait_for_writes waits sooner). A failure costs
        only the cache (one warning line)."""
        if self.used.keys() == self.found.keys():  # nothing made, nothing left unused: the file is this load's
            return None
        everything = dict(self.used)
        writer = threading.Thread(target=self._write, args=(everything,), name="llama_min layout writer",
                                  daemon=True)
        writer.nbytes = sum(t.numel() * t.element_size() for parts in everything.values() for t in parts.values())
        if not WRITERS:
            atexit.register(wait_for_writes, at_exit=True)
        WRITERS.append(writer)
        writer.start()
        return writer

    def _write(self, everything: Dict[str, Parts]):
        from ..files import atomic_write

        try:
            atomic_write(self.path, lambda tmp: write_layout(tmp, everything, self.key, CANCEL))
            prune()
        except Cancelled:  # atomic_write removed the temp file
            pass
        except OSError as e:
            print(f"warning: could not cache the converted layout in {self.path.parent} ({e.strerror or e}); "
                  "the next load converts again", file=sys.stderr, flush=True)


WRITERS: list = []  # the writer threads started by this process
CANCEL = threading.Event()


class Cancelled(Exception):
    """A layout write given up (cancel_writes): its temp file is removed, nothing is cached."""


def writing() -> int:
    """Bytes of the layouts this process is still writing (0: none)."""
    return sum(w.nbytes for w in WRITERS if w.is_alive())


def wait_for_writes(at_exit: bool = False):
    """Wait until every layout this process started writing is written (or has failed). Registered to run
    at exit (the writer threads are daemons: without this, a short script would end before its layout is
    whole); there a Ctrl-C gives the write up instead of printing a traceback."""
    try:
        while WRITERS:
            WRITERS[-1].join()
            WRITERS.pop()
    except KeyboardInterrupt:
        if not at_exit:
            raise
        cancel_writes()


def cancel_writes():
    """Give up the layouts still being written (after a Ctrl-C): each writer stops at its next tensor and
    removes its temp file; the next load converts again."""
    CANCEL.set()
    while WRITERS:
        WRITERS.pop().join()
    CANCEL.clear()


def _populate(buf: mmap.mmap, offset: int, length: int):
    """Map bytes offset .. offset+length of the layout in one call (MADV_POPULATE_READ, Linux 5.14+) rather than
    a fault per 4 KB page."""
    start = offset - offset % mmap.PAGESIZE
    try:
        buf.madvise(MADV_POPULATE_READ, start, offset + length - start)
    except (OSError, AttributeError, ValueError):
        pass


def read_header(buf) -> tuple:
    """(header dict, start of the data section) of a safetensors file's bytes; ValueError if malformed."""
    if len(buf) < 8:
        raise ValueError("too short")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8:
        raise ValueError("header runs past the end")
    header = json.loads(bytes(buf[8 : 8 + n]))
    for name, info in header.items():
        if name != "__metadata__" and (info.get("dtype") not in TORCH_DTYPES or
                                       info["data_offsets"][1] > len(buf) - 8 - n):
            raise ValueError(f"bad entry {name}")
    return header, 8 + n


def write_layout(path, tensors: Dict[str, Parts], meta: dict, cancel: Optional[threading.Event] = None):
    """A safetensors file of every part, as "<tensor>@<how>/<part>", written straight from the tensors' memory.
    cancel: checked before each tensor; when set, Cancelled is raised."""
    entries, offset, order = {}, 0, []
    for name in sorted(tensors):
        for part in sorted(tensors[name]):
            t = tensors[name][part]
            if t.dtype not in DTYPES or not t.is_contiguous():
                raise ValueError(f"cannot cache {name}/{part}: {t.dtype}, contiguous={t.is_contiguous()}")
            size = t.numel() * t.element_size()
            entries[f"{name}/{part}"] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                                         "data_offsets": [offset, offset + size]}
            offset += size
            order.append(t)
    header = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for t in order:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()) if t.numel() else b"")


def prune():
    """Delete layouts whose GGUF file is gone, and temp files over an hour old (a writer killed mid-way)."""
    from ..files import TEMP_PREFIX

    for p in folder().glob(f"{TEMP_PREFIX}*.tmp"):
        try:
            if time.time() - p.stat().st_mtime > 3600:
                p.unlink()
        except OSError:
            pass
    for p in folder().glob("*.safetensors"):
        try:
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                source = json.loads(f.read(n)).get("__metadata__", {}).get("source")
            if source and not Path(source).exists():
                p.unlink()
        except (OSError, ValueError, struct.error):
            pass


def open_cache(gguf_path, tensors, asked: bool = True) -> Optional[LayoutCache]:
    """The LayoutCache of this load, or None when caching is off."""
    return LayoutCache(gguf_path, file_key(gguf_path, tensors)) if enabled(asked) else None
