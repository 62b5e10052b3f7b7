"""The decode step a Llama runs, chosen once when it is built and held by name (`Llama.step`).

  reference  the model's own forward: model.py's Transformer.forward, through whatever modules the
             transforms (transforms.py) swapped in. Every call, any shape, with or without gradients.
  native     steps of fewer than linear.PREFILL_ROWS tokens into a KV cache run every decoder layer in
             one call of llama_min's C code (NativeStep); every other call is the model's own forward
  compiled   one-token steps through torch.compile (compile.py, `Llama.compile()`); every other call is
             the step it was chosen over (native or reference)

Every step feeds a long prompt into a KV cache PROMPT_CHUNK tokens at a time (each part attending to the cached
positions before it, as the next decode steps do): the same logits (bit for bit on the 1.1B shape's 512-token
prompt; tests/test_native_step.py), the same speed (that prompt: 124-134 tok/s in chunks of 256 or 128, 124-129 whole),
and the activations of 256 rows at most, however long the prompt (llama.cpp's `n_ubatch` is 512).

`choose_step(model)` picks native where the C code can multiply by every layer the model holds (float32
activations on a CPU where the kernels build, layers of the kinds listed under NativeStep), else reference.
A model built with `optimize=False` keeps model.py's own classes, which the C step does not take: it runs
the reference. `llama-min generate --verbose` prints the chosen step's name.

Why a native step: after the transforms a small model's decode step is still about ten calls per layer
(norm, q|k|v product, attention, output product, residual add, norm, gate|up product, SwiGLU, down
product, add), and each call from Python costs tens of microseconds of interpreter, dispatch and thread
hand-off, against a few microseconds of work for SmolLM2's small matrices. `native.decode_layers` runs
the same arithmetic for all layers in one call (kernels_avx2.c: the same kernels each call would have
used, in the same order), so the step costs what its weights take to stream from memory.

What it computes is model.py's TransformerBlock, layer after layer, for the new tokens of each row (one
in plain decoding; k+1 when a speculative step checks a draft's k tokens; a short prompt), each token
attending to the cached positions and the new ones up to its own (the causal mask):

    h = h + Attention(RMSNorm(h))        RoPE, cache write and attention as in decode_attention
    h = h + FeedForward(RMSNorm(h))      w2( silu(w1 x) * w3 x )

Rows at different positions (a server's requests, each with its own length): `NativeStep.step_rows`
feeds one token per row, row b at its own position over row b of the caches (native.decode_rows, the
same C step; rows_step(model) gives the NativeStep where the model takes it, for serve/runner.py).

The embedding before the layers and the final norm and output product after them stay PyTorch modules.
A call takes the C path when it feeds fewer than linear.PREFILL_ROWS tokens in all (rows x new tokens;
longer prompts are faster through PyTorch's matrix-matrix kernels) into a KV cache, with gradients off,
and every layer holds kinds the C code multiplies by: float32 weights (nn.Linear, NativeLinear), 4-bit
layers in llama_min's own layout and int8 layers with their native kernel (quantize.py), fused or not, and
a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks where the file holds them (blocks.BlockLinear).
Anything else (long prompts, scoring without a cache, a layer wrapped for tensor parallelism, a bf16
model) goes to the model's own forward. Forward hooks on the layers are not called on the C path.

Safety: the C code reads raw pointers, so it must never read a weight or cache that was replaced or
freed. Every call therefore walks the layers again and compares what it finds (module kinds, the
parameter and buffer objects, their data pointers, shapes, the cache objects) with what the cached
description was read from (_Reads); any difference rebuilds the description before the C code runs.
So a weight changed in place (`load_state_dict`, which copies into the same storage) is read where it
is, and a weight or cache replaced (`.to()`, a new parameter, `setup_cache`) is found changed and read
anew: a stale or freed pointer is never passed. The description holds caches only by weak reference,
so a dropped cache is freed. The walk costs 0.15-0.3 ms a step for SmolLM2's 30 layers and ~1 ms for
the TinyLlama shape's 22 larger ones (the ~800 objects it compares have left the CPU's caches while the
weights streamed through). Measured in generate's loop: 0.5-0.6 ms a token for both, 13% of SmolLM2's step.
So a loop that does not change the model while it runs says so: inside `with step.unchanged_model():`
the walk runs at the first call only (generate, chat and speculative decoding use it around their loops;
the model and its caches are theirs while they run). A callback in such a loop that replaced a layer or
a cache would not be seen: the loops' callbacks only see tokens and text.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch
from torch import nn

from . import native
from .attention import FastAttention
from .blocks import BlockLinear, TiledLinear
from .fusion import FusedAttention, FusedFeedForward
from .linear import PREFILL_ROWS, NativeLinear
from .native_decode import NativeRMSNorm
from ..model import FeedForward, RMSNorm
from .quantize import Int4Linear, Int8Linear


_MISSING = object()
PROMPT_CHUNK = 256  # tokens of a prompt per forward pass into a KV cache (see the module docstring)


class _Reads:
    """The attributes a description was read from, to tell cheaply whether any changed since.

    get(obj, name) is obj.name, remembered with the dictionary it came from (an nn.Module keeps its
    parameters, buffers and submodules in dictionaries of their own), and for a tensor its data pointer:
    `unchanged()` is then a few hundred identity and pointer comparisons (see the module docstring). What a
    module holds is remembered as it is (the model holds it anyway); a KV cache and its tensors only by
    weak reference, so that a cache the model dropped is freed, not kept alive by the description.
    """

    def __init__(self):
        self.held, self.weak, self.pointers, self.sizes = [], [], [], []

    def items(self, modules: nn.ModuleList) -> list:
        """The modules of a ModuleList, each remembered, and their number."""
        self.sizes.append((modules.__dict__["_modules"], len(modules)))
        return [self.get(modules, str(i)) for i in range(len(modules))]

    def get(self, obj, name: str):
        d = _dictionary(obj, name)
        value = d.get(name, _MISSING)
        if value is _MISSING:
            return getattr(obj, name)  # a class attribute: not expected to change
        if isinstance(obj, nn.Module) and isinstance(value, _HELD):
            self.held.append((d, name, value))
            if isinstance(value, torch.Tensor):
                self.pointers.append((value, value.data_ptr()))
        else:  # a cache, or what a cache holds
            ptr = value.data_ptr() if isinstance(value, torch.Tensor) else None
            self.weak.append((weakref.ref(obj), name, weakref.ref(value), ptr))
        return value

    def unchanged(self) -> bool:
        return (all(d.get(name, _MISSING) is value for d, name, value in self.held)
                and all(t.data_ptr() == ptr for t, ptr in self.pointers)
                and all(len(d) == n for d, n in self.sizes)
                and all(_still(owner, name, ref, ptr) for owner, name, ref, ptr in self.weak))


_HELD = (nn.Module, torch.Tensor, int, float, str, type(None))


def _dictionary(obj, name: str) -> dict:
    """The dictionary obj.name is read from: an nn.Module keeps parameters, buffers and submodules apart."""
    for where in ("_parameters", "_buffers", "_modules"):
        d = obj.__dict__.get(where)
        if d is not None and name in d:
            return d
    return obj.__dict__


def _still(owner, name: str, ref, ptr: Optional[int]) -> bool:
    """Whether the object `owner` refers to still holds the one `ref` refers to as `name` (both alive), and a
    tensor its data where it was."""
    obj, value = owner(), ref()
    if obj is None or value is None or _dictionary(obj, name).get(name, _MISSING) is not value:
        return False
    return ptr is None or value.data_ptr() == ptr


def _matrix(r: _Reads, layer: nn.Module) -> Optional[tuple]:
    """(kind, N, K, weight pointer, scales pointer) of a layer the C code multiplies by, else None."""
    kind = type(layer)
    if kind is NativeLinear or (kind is nn.Linear and r.get(layer, "bias") is None):
        w = r.get(layer, "weight")
        if w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() and w.dim() == 2:
            return native.FLOAT32, w.shape[0], w.shape[1], w.data_ptr(), 0
    elif kind is Int4Linear and r.get(layer, "native"):
        codes, dc = r.get(layer, "weight"), r.get(layer, "scales_and_zeros")
        n, k = dc.shape[0], codes.shape[1] * 2
        if (codes.dtype == torch.uint8 and dc.dtype == torch.float16 and k % 32 == 0 and codes.is_contiguous()
                and dc.is_contiguous() and tuple(codes.shape) == (n, k // 2) and tuple(dc.shape) == (n, 2, k // 32)
                and codes.device.type == "cpu" and dc.device.type == "cpu"):
            return native.INT4, n, k, codes.data_ptr(), dc.data_ptr()
    elif kind is BlockLinear:
        blocks, ggml_type, k = r.get(layer, "blocks"), r.get(layer, "ggml_type"), r.get(layer, "in_features")
        native.check_blocks(blocks, ggml_type, k)  # (raises on a bad operand rather than pass it to C)
        return native.BLOCK_TYPES[ggml_type][0], blocks.shape[0], k, blocks.data_ptr(), 0
    elif kind is TiledLinear:
        tiles, ggml_type = r.get(layer, "tiles"), r.get(layer, "ggml_type")
        n, k = r.get(layer, "out_features"), r.get(layer, "in_features")
        return native.check_tiles(tiles, ggml_type, n, k), n, k, tiles.data_ptr(), 0  # (raises rather than pass)
    elif kind is Int8Linear and r.get(layer, "native"):
        w, s = r.get(layer, "weight"), r.get(layer, "scales")
        n, k = w.shape
        if (w.dtype == torch.int8 and s.dtype == torch.float32 and w.device.type == "cpu" and k % 32 == 0
                and s.device.type == "cpu" and w.is_contiguous() and s.is_contiguous() and tuple(s.shape) == (n,)):
            return native.INT8, n, k, w.data_ptr(), s.data_ptr()
    return None


def _norm(r: _Reads, norm: nn.Module) -> Optional[tuple]:
    """(weight pointer, D, eps) of a float32 CPU RMSNorm, else None."""
    if type(norm) not in (RMSNorm, NativeRMSNorm):
        return None
    w = r.get(norm, "weight")
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or w.dim() != 1:
        return None
    return w.data_ptr(), w.shape[0], r.get(norm, "eps")


def _weights(r: _Reads, layer: nn.Module) -> Optional[tuple]:
    """(attention module, norms, q|k|v matrices, wo, gate|up matrices, w2) of one TransformerBlock, the matrices
    as plain values, when the C code multiplies by all of them, else None."""
    att, ffn = r.get(layer, "attention"), r.get(layer, "feed_forward")
    if type(att) is FusedAttention:
        qkv = (_matrix(r, r.get(att, "wqkv")),)
    elif type(att) is FastAttention:
        qkv = tuple(_matrix(r, r.get(att, name)) for name in ("wq", "wk", "wv"))
    else:
        return None
    if type(ffn) is FusedFeedForward:
        up = (_matrix(r, r.get(ffn, "w13")),)
    elif type(ffn) is FeedForward:
        up = (_matrix(r, r.get(ffn, "w1")), _matrix(r, r.get(ffn, "w3")))
    else:
        return None
    wo, w2 = _matrix(r, r.get(att, "wo")), _matrix(r, r.get(ffn, "w2"))
    norms = (_norm(r, r.get(layer, "attention_norm")), _norm(r, r.get(layer, "ffn_norm")))
    if None in qkv or None in up or None in norms or wo is None or w2 is None:
        return None
    return att, norms, qkv, wo, up, w2


def _layer(r: _Reads, layer: nn.Module) -> Optional[tuple]:
    """Everything decode_layers needs of one TransformerBlock (its weights and KV cache), else None."""
    weights = _weights(r, layer)
    cache = r.get(weights[0], "cache") if weights is not None else None
    if cache is None:
        return None
    att, norms, qkv, wo, up, w2 = weights
    k, v = r.get(cache, "k"), r.get(cache, "v")
    H, KV, hd = r.get(att, "n_heads"), r.get(att, "n_kv_heads"), r.get(att, "head_dim")
    if (k.dtype != torch.float32 or v.dtype != torch.float32 or k.device.type != "cpu" or v.device.type != "cpu"
            or not k.is_contiguous() or not v.is_contiguous() or k.shape != v.shape or tuple(k.shape[2:]) != (KV, hd)):
        return None
    dims = (H, KV, hd, w2[2], k.shape[1], k.shape[0])  # H, KV, hd, F, S, the cache's batch size
    return dims, norms, qkv, wo, up, w2, k.data_ptr(), v.data_ptr()


def _fits(dims, norms, qkv, wo, up, w2) -> bool:
    """Whether the matrices' shapes chain: D -> q|k|v -> D, D -> gate|up (2F) -> F -> D."""
    H, KV, hd, F = dims[:4]
    D = norms[0][1]
    return (norms[1][1] == D and all(m[2] == D for m in qkv + up) and sum(m[1] for m in qkv) == (H + 2 * KV) * hd
            and wo[1:3] == (D, H * hd) and sum(m[1] for m in up) == 2 * F and w2[1:3] == (D, F)
            and (len(up) == 1 or up[0][1] == F) and H % KV == 0)


def _struct(entries):
    """The ctypes array of native.Layer for decode_layers, from _layer's tuples."""
    layers = (native.Layer * len(entries))()
    for out, (_, norms, qkv, wo, up, w2, k_ptr, v_ptr) in zip(layers, entries):
        out.attention_norm, out.ffn_norm = norms[0][0], norms[1][0]
        out.n_qkv, out.n_up = len(qkv), len(up)
        for i, m in enumerate(qkv):
            out.qkv[i] = native.Matrix(*m)
        for i, m in enumerate(up):
            out.up[i] = native.Matrix(*m)
        out.wo, out.w2 = native.Matrix(*wo), native.Matrix(*w2)
        out.k_cache, out.v_cache = k_ptr, v_ptr
    return layers


class ReferenceStep:
    """The model's own forward for every call (see the module docstring)."""

    name = "reference"
    about = "the model's own forward: Transformer.forward in model.py, over the layers the model holds"

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        T, m = tokens.shape[1], self.model
        whole = T <= PROMPT_CHUNK or torch.is_grad_enabled() or m.layers[0].attention.cache is None
        if whole or m.params.rope_scaling_type == "dynamic":  # (dynamic: the table depends on the call's length)
            return m(tokens, start_pos, last_only=last_only)
        parts = []  # a long prompt into the cache, PROMPT_CHUNK tokens at a time (see the module docstring)
        for s in range(0, T, PROMPT_CHUNK):
            logits = m(tokens[:, s:s + PROMPT_CHUNK], start_pos + s, last_only=last_only)
            if not last_only or s + PROMPT_CHUNK >= T:  # every position's logits, or the last part's last
                parts.append(logits)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, T or 1, V)

    @contextlib.contextmanager
    def unchanged_model(self):
        """A block of calls during which the model's modules, weights and caches are not replaced (a decode
        loop): the native step checks them at the first call only."""
        yield


class NativeStep(ReferenceStep):
    """Steps of a few tokens into a KV cache through native.decode_layers, the model's own forward for the
    rest (see the module docstring)."""

    name = "native"
    about = (f"steps of fewer than {PREFILL_ROWS} tokens through every layer in one call of llama_min's C code; "
             "longer prompts through the model's own forward")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._reads, self._layers = None, None
        self._trusted = None  # inside unchanged_model(): False until its first call has checked, then True

    @contextlib.contextmanager
    def unchanged_model(self):
        outer, self._trusted = self._trusted, False if self._trusted is None else self._trusted
        try:
            yield
        finally:
            self._trusted = outer

    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        logits = self.try_step(tokens, start_pos, last_only)
        return super().__call__(tokens, start_pos, last_only) if logits is None else logits

    @staticmethod
    def takes(model: nn.Module) -> bool:
        """Whether the C code multiplies by every layer the model holds (its KV cache aside)."""
        if not native.enabled():
            return False
        r = _Reads()
        return all(_weights(r, layer) is not None for layer in r.items(r.get(model, "layers")))

    def try_step(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> Optional[torch.Tensor]:
        """The logits (B, T, V) (T = 1 with last_only) of a step through the C code, or None where it does not
        take the call."""
        B, T = tokens.shape
        layers = self._describe(tokens, B, start_pos, start_pos + T) if B * T < PREFILL_ROWS else None
        if layers is None:
            return None
        m = self.model
        freqs_rows = m.rope_rows(start_pos, T, tokens.device)  # the model's (`dynamic` scaling: for this length)
        h = m.tok_embeddings(tokens)  # (B, T, D)
        h = h.reshape(B * T, -1).to(torch.float32, copy=True).contiguous()  # (B*T, D), ours to update in place
        native.decode_layers(layers, h, T, self._dims[:4], self._eps, freqs_rows, start_pos, self._dims[4])
        h = h.view(B, T, -1)
        if last_only:
            h = h[:, -1:]
        return m.output(m.norm(h)).float()  # (B, T, V)

    def step_rows(self, tokens: torch.Tensor, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """One new token per row, each row at a position of its own (a server's rows, which started at
        different times): tokens (B,), positions (B,) int64 -> float32 logits (B, V), or None where the C
        code does not take the call (then nothing was written).

        Row b's token is at positions[b]: its key and value go to row b of every layer's KV cache (the
        model's caches, batch B or more) at that position, and it attends over row b's positions
        0 .. positions[b], rotated by that position's RoPE angles: per row, what the model's forward
        computes for that row alone with its cache holding the row's earlier positions."""
        B = tokens.shape[0]
        if tokens.dim() != 1 or tuple(positions.shape) != (B,) or B == 0 or B >= PREFILL_ROWS:
            return None
        first, last = int(positions.min()), int(positions.max())
        layers = self._describe(tokens, B, first, last + 1)
        if layers is None:
            return None
        m = self.model
        positions = positions.to(torch.int64).cpu()
        freqs_rows = row_freqs(m, positions, 1)[:, 0]  # (B, hd/2)
        h = m.tok_embeddings(tokens[:, None])[:, 0]  # (B, D)
        h = h.to(torch.float32, copy=True).contiguous()  # ours to update in place
        native.decode_rows(layers, h, self._dims[:4], self._eps, freqs_rows, positions, self._dims[4])
        return m.output(m.norm(h)).float()  # (B, V)

    def _describe(self, tokens: torch.Tensor, B: int, first: int, end: int):
        """The ctypes description of the layers when a call of B rows at positions first .. end-1 can take the
        C path, else None; rebuilt only when something it was read from changed."""
        if tokens.device.type != "cpu" or torch.is_grad_enabled():
            return None
        if not self._trusted and (self._reads is None or not self._reads.unchanged()):
            self._build()
        if self._trusted is False:
            self._trusted = True  # checked: the rest of the unchanged_model() block trusts it
        if self._layers is None or B > self._dims[5] or first < 0 or end > self._dims[4]:
            return None
        return self._layers

    def _build(self):
        """Read the model's layers into a ctypes description (self._layers, or None where one does not fit)."""
        r, m = _Reads(), self.model
        entries = [_layer(r, layer) for layer in r.items(r.get(m, "layers"))]
        self._reads, self._layers = r, None
        if not entries or None in entries:
            return
        eps = {e for entry in entries for _, _, e in entry[1]}
        first = entries[0]
        if (any(e[0] != first[0] or not _fits(*e[:6]) for e in entries) or len(eps) != 1
                or first[1][0][1] != m.params.dim):
            return
        self._layers, self._dims, self._eps = _struct(entries), first[0], eps.pop()


def row_freqs(model: nn.Module, starts: torch.Tensor, T: int) -> torch.Tensor:
    """freqs_cis rows (B, T, hd/2) for row b's positions starts[b] .. starts[b]+T-1, each as model.rope_rows
    gives them for that row alone (`dynamic` scaling past the trained window: the row's own table)."""
    p = model.params
    ends = starts + T
    if p.rope_scaling_type == "dynamic" and int(ends.max()) > p.rope_original_max_pos:
        return torch.stack([model.rope_rows(int(s), T, starts.device) for s in starts.tolist()])
    table = model.rope_rows(0, int(ends.max()), starts.device)  # (max end, hd/2) rows of the model's table
    return table[starts[:, None] + torch.arange(T, device=starts.device)]  # (B, T, hd/2)


def unchanged_model(step):
    """step.unchanged_model() for llama_min's steps; for any other callable a Llama was given as its step, a block
    that does nothing."""
    return step.unchanged_model() if isinstance(step, ReferenceStep) else contextlib.nullcontext()


def rows_step(model: nn.Module) -> Optional[NativeStep]:
    """A NativeStep for `model` where choose_step would pick the C step (its `step_rows` then decodes rows
    at positions of their own), else None."""
    step = choose_step(model)
    return step if isinstance(step, NativeStep) else None


def choose_step(model: nn.Module) -> ReferenceStep:
    """The step to run `model` with: native where the C code takes its layers (float32 activations on a
    CPU where llama_min's kernels build), else the model's own forward."""
    weight = model.norm.weight
    on_cpu_float32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    return NativeStep(model) if on_cpu_float32 and NativeStep.takes(model) else ReferenceStep(model)
