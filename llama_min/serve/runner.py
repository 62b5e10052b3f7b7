"""The serving step: a batch of rows, each at its own position over its own keys and values.

model.py's forward takes one start_pos for the whole batch (Meta's lockstep generation). A server's rows
started at different times, so here every row b has its own start s_b and its own KV slot, and the step
computes, for each row, exactly what model.py's forward computes for that row alone:

  RoPE         row b's new tokens are rotated by freqs_cis rows s_b .. s_b+T-1 (row_freqs, rotate)
  cache        their keys/values are written to slot b at positions s_b .. s_b+T-1 (SlotCache.write_rows)
  attention    query t of row b sees the slot's positions 0 .. s_b+t, nothing else (row_mask): the columns
               past a row's own length hold another request's leftovers or zeros, and are masked to -inf

The rest of a layer (norms, the q|k|v and output products, the SwiGLU) is the model's own modules, called
with the batch: the packed 4-bit / int8 / float layers read each weight once for all rows.

  SlotCache       keys/values of every running row: (n_layers, 2, slots, capacity, kv_heads, head_dim);
                  grows by doubling up to the window; moves a row (when one leaves, the last fills its slot,
                  so the running rows are always slots 0 .. n-1 and the batch reads a plain view)
  batched_step    the per-row step above, through the model's layers
  Runner          prefill (one request: the model's own step into its slot, so llama_min's C step where it
                  takes the call), decode (all running rows: one row -> the model's own step; several rows
                  -> the C step with a position per row where the model takes it, else batched_step), and
                  the K/V copies for the prefix cache

Several rows in one C call: where llama_min's C decode step takes the model (runtime/step.py: float32,
int8 or packed 4-bit layers on an AVX2 CPU), decode runs NativeStep.step_rows, every layer of the step in
one call with row b at its own position over slot b (the model's layer caches pointed at all the slots);
it reads each weight once for all rows, as batched_step does, without batched_step's few hundred PyTorch
calls. batched_step is the path for every other model (bf16, a GPU, no C compiler).

Measured on the default model (SmolLM2-135M packed Q4_1, 2 threads, rows at positions 23..140, median ms
per decode step, interleaved rounds, load average below 1.2): 2 / 4 / 8 rows took 8.9 / 14.4 / 29.2 ms in
one C call, 17.6 / 23.5 / 39.4 through batched_step, 14.8 / 30.0 / 61.0 as one C step per row (one row:
5.6); a later run, 20% faster throughout, gave the same ratios (8 rows: 22.8 / 33.8 / 45.5). The C call's cost still grows with the rows: its 4-bit and int8 products are bound by the integer
multiply-adds once the weights are in cache (8 rows ~5x one row through the layers, ~6x through the int8
output layer; kernels_avx2.c).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..model import KVCache, repeat_kv
from ..runtime.attention import SDPA_GQA
from ..runtime.memory import check_memory
from ..runtime.step import row_freqs, rows_step


class SlotCache:
    """Keys and values (after RoPE) of `slots` rows, `capacity` positions each, every layer in one tensor:
    data (n_layers, 2, slots, capacity, kv_heads, head_dim); data[l, 0] is layer l's keys (slots, cap, K, hd)."""

    def __init__(self, n_layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int, dtype, device,
                 capacity: int = 256):
        self.shape = (n_layers, 2, slots, kv_heads, head_dim)
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.data = self._alloc(min(capacity, max_len))
        self._views: dict = {}

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    def _alloc(self, capacity: int) -> torch.Tensor:
        L, two, B, K, hd = self.shape
        item = torch.empty((), dtype=self.dtype).element_size()
        check_memory(L * two * B * capacity * K * hd * item, f"a KV cache of {B} rows x {capacity} positions",
                     self.device)
        return torch.zeros(L, two, B, capacity, K, hd, dtype=self.dtype, device=self.device)

    def ensure(self, positions: int) -> None:
        """Room for `positions` positions per row (doubling, at most max_len); the rows keep their contents."""
        if positions <= self.capacity:
            return
        if positions > self.max_len:
            raise ValueError(f"{positions} positions exceed the window of {self.max_len}")
        cap = self.capacity
        while cap < positions:
            cap = min(self.max_len, 2 * cap)
        data = self._alloc(cap)
        data[:, :, :, : self.capacity] = self.data
        self.data, self._views = data, {}

    def all_views(self) -> List[KVCache]:
        """model.py KVCache objects over every slot (slots, capacity, K, hd), views, one per layer: the C step
        with a position per row reads and writes slot b as its row b. The same objects until the cache grows."""
        if "all" not in self._views:
            caches = []
            for i in range(self.shape[0]):
                c = KVCache.__new__(KVCache)  # no allocation: k and v are views of every slot
                c.k, c.v = self.data[i, 0], self.data[i, 1]
                caches.append(c)
            self._views["all"] = caches
        return self._views["all"]

    def layer(self, i: int):
        """Layer i's keys and values, (slots, capacity, K, hd) each (views)."""
        return self.data[i, 0], self.data[i, 1]

    def views(self, slot: int) -> List[KVCache]:
        """model.py KVCache objects over one slot (batch 1, views of this storage, not copies), one per layer:
        the model's own forward then reads and writes this row. The same objects until the cache grows."""
        if slot not in self._views:
            caches = []
            for i in range(self.shape[0]):
                c = KVCache.__new__(KVCache)  # no allocation: k and v are views of this slot
                c.k, c.v = self.data[i, 0, slot:slot + 1], self.data[i, 1, slot:slot + 1]
                caches.append(c)
            self._views[slot] = caches
        return self._views[slot]

    def write_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v (B, T, K, hd) of rows 0..B-1 at positions (B, T) into layer `layer`'s slots."""
        B, T = positions.shape
        rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)
        self.data[layer, 0][rows, positions] = k
        self.data[layer, 1][rows, positions] = v

    def read(self, slot: int, start: int, end: int) -> torch.Tensor:
        """A copy of one slot's K/V at positions [start, end): (n_layers, 2, end-start, K, hd)."""
        return self.data[:, :, slot, start:end].clone()

    def write(self, slot: int, start: int, kv: torch.Tensor) -> None:
        """kv (n_layers, 2, n, K, hd) into one slot at positions [start, start+n)."""
        self.data[:, :, slot, start:start + kv.shape[2]] = kv

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot src's first `length` positions into slot dst (a row changes slot)."""
        self.data[:, :, dst, :length] = self.data[:, :, src, :length]


# ------------------------------------------------------------------------------ the per-row step, in parts


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """model.apply_rotary_emb with a row of angles per batch row: x (B, T, heads, hd), freqs (B, T, hd/2)."""
    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, heads, hd/2)
    return torch.view_as_real(x_c * freqs[:, :, None, :]).flatten(3).type_as(x)


def row_mask(starts: torch.Tensor, T: int, S: int, dtype) -> torch.Tensor:
    """(B, 1, T, S) additive mask: query t of row b sees columns 0 .. starts[b]+t (0), the rest -inf."""
    cols = torch.arange(S, device=starts.device)
    last = starts[:, None] + torch.arange(T, device=starts.device)  # (B, T): each query's own position
    seen = cols[None, None, :] <= last[:, :, None]  # (B, T, S)
    mask = torch.zeros(seen.shape, dtype=dtype, device=starts.device).masked_fill(~seen, float("-inf"))
    return mask[:, None]


def project(att, x: torch.Tensor):
    """q (B, T, H, hd), k and v (B, T, K, hd) of an attention module (model.py's, or the runtime's fused and
    fast ones, which have `project`)."""
    if hasattr(att, "project"):
        return att.project(x)
    B, T, _ = x.shape
    return (att.wq(x).view(B, T, att.n_heads, att.head_dim), att.wk(x).view(B, T, att.n_kv_heads, att.head_dim),
            att.wv(x).view(B, T, att.n_kv_heads, att.head_dim))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, n_rep: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v: q (B, T, H, hd), k and v (B, S, K, hd) -> (B, T, H, hd).

    One new token per row (decoding) is written out as model.attention_math, the n_rep query heads that share
    a KV head read as n_rep rows of one product (no copy of the cache; a masked fused kernel cost ~140 us a
    layer for 8 rows of SmolLM2 here, this a fraction of it); longer inputs go to the fused kernel."""
    B, T, H, hd = q.shape
    if T == 1:
        K = k.shape[2]
        qg = q.view(B, K, n_rep, hd)  # (B, K, n_rep, hd): head h = g * n_rep + r
        scores = qg @ k.permute(0, 2, 3, 1) / math.sqrt(hd)  # (B, K, n_rep, S)
        probs = F.softmax((scores + mask).float(), dim=-1).type_as(q)  # mask (B, 1, 1, S)
        return (probs @ v.transpose(1, 2)).reshape(B, 1, H, hd)  # (B, K, n_rep, hd) -> (B, 1, H, hd)
    gqa = {"enable_gqa": True} if SDPA_GQA and n_rep > 1 else {}  # query head h reads KV head h // n_rep
    if n_rep > 1 and not gqa:
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, **gqa)  # (B, H, T, hd)
    return out.transpose(1, 2)


def batched_step(model, cache: SlotCache, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) of rows 0..B-1 (slots 0..B-1), row b at positions starts[b] .. starts[b]+T-1 ->
    float32 logits (B, T, V); writes the rows' keys/values into their slots. Per row, what model.py's forward
    computes for that row alone with its cache holding the row's positions < starts[b]."""
    B, T = tokens.shape
    S = int(starts.max()) + T  # the longest row's length after this step
    cache.ensure(S)
    freqs = row_freqs(model, starts, T)  # (B, T, hd/2)
    positions = starts[:, None] + torch.arange(T, device=starts.device)  # (B, T)
    h = model.tok_embeddings(tokens)  # (B, T, D)
    mask = row_mask(starts, T, S, h.dtype)  # (B, 1, T, S)
    for i, layer in enumerate(model.layers):
        att = layer.attention
        q, k, v = project(att, layer.attention_norm(h))
        q, k = rotate(q, freqs), rotate(k, freqs)
        cache.write_rows(i, k, v, positions)
        keys, values = cache.layer(i)
        out = attend(q, keys[:B, :S], values[:B, :S], mask, att.n_heads // att.n_kv_heads)  # (B, T, H, hd)
        h = h + att.wo(out.reshape(B, T, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()  # (B, T, V)


# ------------------------------------------------------------------------------------------------ Runner


class Runner:
    """The model's steps for the engine: prefill one row, decode all running rows (module docstring).

    `llama` is a generation.Llama; while the runner is in use it sets the model's layer caches to views of
    its slots (the model's own step reads and writes a row through them): nothing else may run the model."""

    def __init__(self, llama, max_batch: int, max_len: Optional[int] = None, capacity: int = 256):
        self.llama, self.model = llama, llama.model
        p, ref = self.model.params, self.model.norm.weight
        self.max_len = max_len or llama.max_seq_len
        self.cache = SlotCache(p.n_layers, max_batch, p.kv_heads, p.hd, self.max_len, ref.dtype, ref.device,
                               capacity)
        self.device = ref.device
        self.native_rows = rows_step(self.model)  # the C step with a position per row, or None: batched_step

    def _use_slot(self, slot: int) -> None:
        """Point the model's layer caches at one slot (the same objects while the cache does not grow, so the
        C step's description of the layers stays valid)."""
        self._use_caches(self.cache.views(slot))

    def _use_caches(self, caches: List[KVCache]) -> None:
        for layer, c in zip(self.model.layers, caches):
            if layer.attention.cache is not c:
                layer.attention.cache = c

    def release(self) -> None:
        """Give the model back its cache-free state (the slots stay allocated until the runner is dropped)."""
        self.model.clear_cache()

    @torch.inference_mode()
    def prefill(self, slot: int, ids: List[int], start: int) -> torch.Tensor:
        """Feed ids at positions start .. start+len-1 of one slot (positions < start already hold the row's
        K/V) through the model's own step; the last position's logits (V,)."""
        self.cache.ensure(start + len(ids))
        self._use_slot(slot)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.llama.step(tokens, start, last_only=True)[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: List[int], positions: List[int]) -> torch.Tensor:
        """One new token per running row (row b in slot b, at positions[b]) -> logits (B, V)."""
        if len(tokens) == 1:
            return self.prefill(0, tokens, positions[0])[None]
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        starts = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.native_rows is not None:
            self.cache.ensure(max(positions) + 1)
            self._use_caches(self.cache.all_views())
            logits = self.native_rows.step_rows(ids, starts)
            if logits is not None:
                return logits
        return batched_step(self.model, self.cache, ids[:, None], starts)[:, -1]

    @torch.inference_mode()
    def read_kv(self, slot: int, start: int, end: int) -> torch.Tensor:
        return self.cache.read(slot, start, end)

    @torch.inference_mode()
    def write_kv(self, slot: int, start: int, kv: torch.Tensor) -> None:
        self.cache.ensure(start + kv.shape[2])
        self.cache.write(slot, start, kv)

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)
