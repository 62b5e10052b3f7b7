"""Memory checks made before allocating: what the device has free, what a window will need at its peak,
and a refusal with the numbers.

The estimate (`window_peak`) counts what the context window itself costs, beyond the weights:

  building    precompute_freqs_cis's temporaries for the RoPE table of 2 * max_seq_len positions (Meta
              precomputes twice the window): positions, angles, ones_like(angles) and the complex64 result
  running     the finished RoPE table + the KV cache (batch x max_seq_len) + one forward of `scored`
              positions per row (float32 logits, the causal mask, one layer's activations)

The peak is the larger of the two (the build's temporaries are freed before anything runs). The RoPE
table is always built on the CPU (model.rope_frequencies); on a GPU the running part lives on the device.
Callers: Llama.build (float path), runtime.packed.load_gguf_packed, parallel.slicing.load_rank_model (each
rank's share of the KV heads), Llama._setup_cache (each request's KV cache). `window_peak` takes
ModelArgs-like params (dim, n_layers, n_heads, kv_heads, hd, ffn_hidden, vocab_size), so other
preflights (training) can reuse its parts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import LlamaMinError

GiB = 2**30
ALLOCATOR_SLACK = 4 * 2**20  # page rounding and bookkeeping of a few large tensors (measured: ~1.3 MiB)


def free_memory(device) -> Optional[int]:
    """Bytes that can still be allocated on the device (None when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(n_bytes: int, what: str, device) -> None:
    """Refuse, before allocating, a request that cannot fit the device's free memory (with the numbers)."""
    free = free_memory(device)
    if free is not None and n_bytes > free:
        raise LlamaMinError(f"{what} needs {n_bytes / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB is free "
                            f"on {device}: ask for fewer positions (max_seq_len / max_gen_len) or a smaller batch")


# --- the parts of a window's cost, each the formula of the code that allocates it ---------------------------


def rope_build_bytes(hd: int, positions: int) -> int:
    """Peak while precompute_freqs_cis(freqs, positions) runs, P = positions, hd/2 pairs per position:
    arange (4 P) + angles (4 P hd/2) + ones_like(angles) (4 P hd/2) + polar's complex64 result (8 P hd/2),
    + ALLOCATOR_SLACK (a measured peak passes the tensors' sum by about a megabyte)."""
    return 4 * positions + positions * (hd // 2) * (4 + 4 + 8) + ALLOCATOR_SLACK


def rope_table_bytes(hd: int, positions: int) -> int:
    """The finished table kept by the model: (P, hd/2) complex64 = 8 P hd/2 bytes."""
    return 8 * positions * (hd // 2)


def kv_cache_bytes(n_layers: int, kv_heads: int, hd: int, batch: int, positions: int, item: int) -> int:
    """Keys and values of every layer: 2 * n_layers * batch * positions * kv_heads * hd * item bytes."""
    return 2 * n_layers * batch * positions * kv_heads * hd * item


def forward_bytes(params, batch: int, rows: int) -> int:
    """A reference forward of `rows` new positions per row (the largest part alive at once), float32:
    logits 4 B T V, + the causal mask 4 T^2 (built as three T x T tensors, 12 T^2, when nothing else is),
    + one layer's activations, twice what its tensors take, 2 * 4 B T (4 D + 3 F + 3 (H + 2 K) hd): the
    residual, norm, q/k/v and their rotated copies, repeated keys/values, the SwiGLU's F-wide tensors, and as
    much again for what the allocator keeps of freed blocks (measured peaks of a tiny model reach ~1.6x the
    counted tensors: tests/test_memory_preflight.py)."""
    bt, d, hd = batch * rows, params.dim, params.hd
    logits = 4 * bt * max(params.vocab_size, 0)
    mask = 4 * rows * rows if rows > 1 else 0
    layer = 2 * 4 * bt * (4 * d + 3 * params.ffn_hidden + 3 * (params.n_heads + 2 * params.kv_heads) * hd)
    return logits + max(3 * mask, mask + layer)


@dataclass
class WindowPeak:
    """What a window costs, in bytes: `parts` (label -> bytes, for the message), `building` (host, while
    the RoPE table is computed) and `running` (the device, once it runs); `peak` = the larger."""

    parts: dict = field(default_factory=dict)
    building: int = 0
    running: int = 0

    @property
    def peak(self) -> int:
        return max(self.building, self.running)

    def describe(self) -> str:
        return "; ".join(f"{label}: {show_bytes(n)}" for label, n in self.parts.items())


def window_peak(params, max_seq_len: int, batch: int = 1, item: int = 4, scored: int = 1,
                kv_heads: Optional[int] = None) -> WindowPeak:
    """The peak a window of max_seq_len positions costs (module docstring), for `batch` rows.

    params: ModelArgs-like; item: bytes per KV-cache element (the model's dtype); scored: positions per
    row whose logits one forward returns (1 when generating, the window when scoring); kv_heads: the
    heads this process holds (a tensor-parallel rank's share; default params.kv_heads)."""
    hd, positions = params.hd, 2 * max_seq_len  # Meta's table covers twice the window
    kv = kv_cache_bytes(params.n_layers, kv_heads or params.kv_heads, hd, batch, max_seq_len, item)
    table, forward = rope_table_bytes(hd, positions), forward_bytes(params, batch, scored)
    # peak = max(building, running): the build's temporaries are gone before the cache and a forward exist
    out = WindowPeak(building=rope_build_bytes(hd, positions), running=table + kv + forward)
    out.parts[f"RoPE table for {positions} positions while built"] = out.building
    out.parts["RoPE table kept"] = table
    out.parts[f"KV cache for {batch} x {max_seq_len} positions"] = kv
    out.parts[f"a forward of {batch} x {scored} positions"] = forward
    return out


def show_bytes(n: int) -> str:
    """1.5 GiB / 1.2 TiB / 340 MiB."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20)):
        if n >= size or unit == "MiB":
            return f"{n / size:.1f} {unit}"


WINDOW_FLAGS = "lower max_seq_len (-c/--max-seq-len; eval: --ctx)"


def check_window(params, max_seq_len: int, batch: int, device, item: int = 4, scored: int = 1,
                 kv_heads: Optional[int] = None) -> WindowPeak:
    """Refuse, before anything of the window is allocated, a max_seq_len / batch whose peak does not fit.

    scored: positions per row whose logits a forward returns: 1 when generating (only the last position's
    logits are kept; what Llama.build checks), the window when scoring (`llama-min eval` checks that once
    the model is built). On the CPU the peak is compared with free memory;
    on a GPU the build (on the host) with the host's free memory and the running part with the device's.
    One line, with the numbers and what to change."""
    need = window_peak(params, max_seq_len, batch, item, scored, kv_heads)
    device = torch.device(device)
    checks = [(need.peak, "cpu")] if device.type == "cpu" else [(need.building, "cpu"), (need.running, device)]
    for n_bytes, where in checks:
        free = free_memory(where)
        if free is not None and n_bytes > free:
            what = f"max_seq_len {max_seq_len} (-c)" + (f" x max_batch_size {batch}" if batch > 1 else "")
            fix = WINDOW_FLAGS + (" or max_batch_size (--batch-size)" if batch > 1 else "")
            raise LlamaMinError(f"{what} needs ~{show_bytes(n_bytes)} at its peak ({need.describe()}), but "
                                f"{show_bytes(free)} is free on {where}: {fix}")
    return need


def return_freed_memory():
    """Hand memory freed by temporaries (a tensor's conversion, the originals of weights copied elsewhere) back
    to the OS: glibc keeps it in its heap otherwise, and resident memory would keep both copies' worth."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
