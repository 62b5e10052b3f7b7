"""Weights in memory backed by 2 MB pages (Linux transparent huge pages), for CPU decoding.

A decode step streams every weight once per token. The CPU translates each address through the TLB, which
holds a few thousand page translations: with ordinary 4 KB pages a float32 SmolLM2 step (540 MB) crosses
about 130,000 of them, and llama_min's float32 kernel reads eight weight rows side by side, so eight page
streams at once. Backed by 2 MB pages the same step crosses ~270. On this project's 2-core AVX2 machine,
with every PyTorch allocation on huge pages (THP_MEM_ALLOC_ENABLE=1), the float32 SmolLM2 step ran 10-13%
faster (two alternating pairs of runs: 29.5 and 30.5 against 33.6 and 35.1 ms a token; 33.3 and 33.3
against 37.2 and 35.0), while a plain sum over a 256 MB matrix streamed at the same rate either way. The
kernel hands out huge pages only while it has free 2 MB blocks (in one run 110 MB of the ~410 MB this
moves got them), so the gain varies: 2-8% in two pairs of runs with this transform, none in a third.

Linux gives an anonymous allocation 2 MB pages when the region is 2 MB-aligned and marked with
madvise(MADV_HUGEPAGE) (or always, if /sys/kernel/mm/transparent_hugepage/enabled says "always") before
it is first touched. `use_huge_pages` copies each large weight of a built model into such a region and
points the parameter at the copy: the same numbers, bit for bit, and one copy at a time in flight. Weights
that live in a memory-mapped checkpoint file stay where they are (a copy would hold them twice while the
file stays mapped). Elsewhere (not Linux, huge pages "never") it does nothing.
"""

from __future__ import annotations

import bisect
import mmap
import sys
from pathlib import Path

import torch
from torch import nn

from .memory import return_freed_memory

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # a smaller weight holds no whole huge page
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Linux with transparent huge pages in "always" or "madvise" mode."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return False
    return ("[always]" in mode or "[madvise]" in mode) and hasattr(mmap.mmap, "madvise")


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor t in a fresh anonymous mapping, its data starting on a 2 MB boundary
    and its whole 2 MB stretches advised MADV_HUGEPAGE before they are touched (a tail of under 2 MB keeps
    small pages). The pages before the boundary are never touched, so they take no memory."""
    out = _huge_page_empty(t.shape, t.dtype, t.nbytes)
    out.copy_(t)
    return out


def empty(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """torch.empty, on huge pages where use_huge_pages would move the result (a large CPU tensor, huge pages
    available): a buffer filled once at load is then never copied, so the model's largest weight is never held
    twice (the 8B shape's int8 output layer: 525 MB)."""
    device = torch.device(device or "cpu")
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < MIN_BYTES or not available():
        return torch.empty(shape, dtype=dtype, device=device)
    return _huge_page_empty(shape, dtype, nbytes)


def _huge_page_empty(shape, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """An uninitialized tensor in a fresh anonymous mapping, its data on a 2 MB boundary, its whole 2 MB stretches
    advised MADV_HUGEPAGE before they are touched (where the advice is not taken, pages stay small; a tail of
    under 2 MB keeps small pages). The pages before the boundary are never touched, so they take no memory."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE)  # fresh from the kernel: not touched yet
    raw = torch.frombuffer(region, dtype=torch.uint8)  # (the tensor keeps the mapping alive)
    start = -raw.data_ptr() % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if whole:
        region.madvise(MADV_HUGEPAGE, start, whole)
    return raw[start:start + nbytes].view(dtype).view(shape)


def _file_backed_ranges() -> tuple:
    """(starts, ends) of this process's memory mappings that map a file, sorted (from /proc/self/maps)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            spans.append((lo, hi))
    spans.sort()
    return [lo for lo, _ in spans], [hi for _, hi in spans]


def _in_file(ptr: int, ranges: tuple) -> bool:
    starts, ends = ranges
    i = bisect.bisect_right(starts, ptr) - 1
    return i >= 0 and ptr < ends[i]


def _movable(t, ranges: tuple) -> bool:
    """A plain (strided) CPU tensor of MIN_BYTES or more, contiguous, not in a mapped file and not already on a
    2 MB boundary (a copy made before: a tied weight is met twice). oneDNN's opaque weights have no address
    of their own to move."""
    return (t is not None and t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()
            and t.nbytes >= MIN_BYTES
            and t.data_ptr() % HUGE_PAGE != 0 and not _in_file(t.data_ptr(), ranges))


def use_huge_pages(model: nn.Module) -> nn.Module:
    """Every CPU parameter and buffer of MIN_BYTES or more that is contiguous and not in a mapped file ->
    a huge-page copy (huge_page_copy); tied parameters stay one tensor. Returns the model."""
    if not available():
        return model
    ranges = _file_backed_ranges()
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if not _movable(t, ranges):
                    continue
                copy = huge_page_copy(t.detach())
                if isinstance(t, nn.Parameter):
                    t.data = copy  # the same Parameter object: modules that share it see the copy
                else:
                    table[name] = copy
                del t
                return_freed_memory()  # the original's pages, now: else the heap keeps every original to the end
    return model
