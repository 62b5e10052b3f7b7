"""Keys and values of prompt prefixes, kept so that a prefix seen before is not computed again.

A chat client resends the whole conversation every turn, and many requests share a system prompt: their
prompts begin with tokens whose keys and values (K/V) were computed already. The token ids are cut into
blocks of `block_size`; block i is named by a hash of (block i-1's name, its tokens), so a name stands for
the whole prefix up to the block's end (K/V at a position depend on every token before it), as in
vLLM's / nano-vllm's prefix caching. Only whole blocks are kept.

  match(ids, limit)   the longest run of blocks at the start of `ids` that are held (at most `limit` tokens)
  insert(ids, ...)    keep the whole blocks of `ids` not held yet, given a function that reads their K/V
  budget              the bytes the blocks may take; past it, the least recently used go first

Eviction order: a match or insert marks its blocks used from the last to the first, so a prefix's first
blocks are always more recent than its later ones and the tail of a prefix goes before its head (a head
without its tail is still useful; a tail without its head never matches again).

The K/V of a block are one tensor (n_layers, 2, block_size, kv_heads, head_dim); this module does not look
inside it (runner.py reads and writes it). Copies, not shared pages: a hit copies the blocks into the
request's row (~46 KB a token for SmolLM2-135M, far cheaper than computing them).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

BLOCK_SIZE = 16  # tokens per block: small enough that most of a shared prefix is reused


def block_key(parent: bytes, tokens: Tuple[int, ...]) -> bytes:
    """The name of a block: a 128-bit hash of its parent's name and its token ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in tokens))
    return h.digest()


ROOT = b""  # the parent name of a prompt's first block


@dataclass
class Block:
    key: bytes
    tokens: Tuple[int, ...]
    kv: torch.Tensor  # (n_layers, 2, block_size, kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixCache:
    """Blocks of K/V by prefix hash, least recently used first, under `budget` bytes (module docstring)."""

    def __init__(self, budget: int, block_size: int = BLOCK_SIZE):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.budget, self.block_size = max(0, int(budget)), block_size
        self.blocks: "OrderedDict[bytes, Block]" = OrderedDict()
        self.bytes = 0
        self.hit_tokens = 0  # tokens served from the cache so far (for reports)

    def __len__(self) -> int:
        return len(self.blocks)

    def chain(self, ids: List[int], n_blocks: int) -> List[bytes]:
        """The names of the first n_blocks whole blocks of ids."""
        keys, parent, b = [], ROOT, self.block_size
        for i in range(n_blocks):
            parent = block_key(parent, tuple(ids[i * b:(i + 1) * b]))
            keys.append(parent)
        return keys

    def match(self, ids: List[int], limit: int) -> List[Block]:
        """The held blocks covering the longest prefix of ids, at most `limit` tokens; marks them used."""
        found = []
        for i, key in enumerate(self.chain(ids, max(0, min(limit, len(ids))) // self.block_size)):
            block = self.blocks.get(key)
            if block is None or list(block.tokens) != ids[i * self.block_size:(i + 1) * self.block_size]:
                break
            found.append(block)
        self._touch([blk.key for blk in found])
        self.hit_tokens += len(found) * self.block_size
        return found

    def insert(self, ids: List[int], n_tokens: int, read_kv: Callable[[int, int], torch.Tensor]) -> int:
        """Keep the whole blocks of ids[:n_tokens] not held yet; read_kv(start, end) gives their K/V
        (a tensor this cache may keep). Returns how many blocks were added (before any eviction)."""
        b = self.block_size
        keys, added = self.chain(ids, n_tokens // b), 0
        if self.budget <= 0:
            return 0
        for i, key in enumerate(keys):
            if key not in self.blocks:
                block = Block(key, tuple(ids[i * b:(i + 1) * b]), read_kv(i * b, (i + 1) * b))
                self.blocks[key] = block
                self.bytes += block.nbytes
                added += 1
        self._touch(keys)
        self.evict()
        return added

    def evict(self) -> None:
        """Drop least recently used blocks until the held bytes fit the budget."""
        while self.bytes > self.budget and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.bytes -= block.nbytes

    def _touch(self, keys: List[bytes]) -> None:
        """Mark keys used, the first key most recently (so a prefix's tail is evicted before its head)."""
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)
