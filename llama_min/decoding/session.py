"""ChatSession: a multi-turn chat (batch 1) that keeps its KV cache between turns.

Each turn encodes the whole dialog, finds how much of it is already in the cache (the longest common
prefix with the tokens fed so far) and prefills only the rest, then decodes until a stop token. So any
edit of the dialog (undo the last exchange, a new system message, an answer cut short by Ctrl-C) stays
correct: the cache is reused up to the first token that differs and recomputed from there.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

import torch

from ..errors import LlamaMinError
from ..files import atomic_write
from ..model import KVCache
from ..parallel.group import broadcast_from_rank0
from ..runtime.step import unchanged_model
from .sampling import Sampling, Stats, elapsed, sample_next


class ChatSession:
    """A dialog with a model (`llama`, a generation.Llama): `ask(text)` answers and remembers; `undo`,
    `set_system`, `reset`, `save`."""

    def __init__(self, llama, system: Optional[str] = None, seed: Optional[int] = None, **sampling):
        self.llama, self.system = llama, system
        self.sampling = Sampling(**sampling)
        self.generator = None if seed is None else torch.Generator(llama.device).manual_seed(seed)
        self.reset()

    def reset(self):
        """Forget the conversation (the system message stays)."""
        self.dialog = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list = []  # token ids whose keys/values sit in the cache, in order
        self._cache = None  # the cache object this session set up (layer 0's), to notice if it was replaced
        self.llama.model.clear_cache()

    def set_system(self, text: Optional[str]):
        """Replace (or with None/"" remove) the system message; the conversation stays."""
        turns = [m for m in self.dialog if m["role"] != "system"]
        self.system = text or None
        self.dialog = ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def undo(self) -> bool:
        """Drop the last exchange (user message and answer); False when there is none."""
        if not self.dialog or self.dialog[-1]["role"] != "assistant":
            return False
        self.dialog = self.dialog[:-2]
        return True

    def save(self, path) -> None:
        """Write the dialog as JSON ([{"role", "content"}, ...]), atomically."""
        atomic_write(path, json.dumps(self.dialog, indent=2, ensure_ascii=False) + "\n")

    def _ensure_cache(self, needed: int):
        """Grow the cache (doubling, capped by the window), keeping the positions it holds.

        If someone else used the model meanwhile (a generate() call sets up and clears its own cache),
        the cache is no longer ours: start from an empty one."""
        model = self.llama.model
        if model.layers[0].attention.cache is not self._cache:
            self.cached = []
            model.clear_cache()
        have = model.cache_len
        if needed <= have:
            return
        size = min(self.llama.max_seq_len, max(needed, 2 * have, 256))
        if not have:
            model.setup_cache(1, size)
        else:
            for layer in model.layers:  # a bigger cache holding the same positions
                old = layer.attention.cache
                layer.attention.cache = KVCache(1, size, *old.k.shape[2:], old.k.dtype, old.k.device)
                layer.attention.cache.update(0, old.k, old.v)
        self._cache = model.layers[0].attention.cache

    def _prefill(self, ids: list) -> torch.Tensor:
        """Feed the part of `ids` not already in the cache; the last position's logits (1, 1, V)."""
        keep = 0
        while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1
        self.cached = self.cached[:keep]  # what stays valid if the prefill is interrupted
        llama = self.llama
        logits = llama.step(torch.tensor([ids[keep:]], device=llama.device), keep, last_only=True)
        self.cached = list(ids)
        llama.stats.prompt_tokens = len(ids) - keep
        return logits

    @torch.inference_mode()
    def ask(self, text: str, max_gen_len: int = 512, on_token: Optional[Callable[[int], None]] = None,
            prefill: str = "") -> str:
        """Answer `text` and remember the exchange; the answer starts with `prefill` (which the model then
        continues). Ctrl-C (KeyboardInterrupt) while answering keeps the answer so far in the dialog, with the
        cache consistent, then re-raises. Returns the answer (prefill included)."""
        llama, tok = self.llama, self.llama.tokenizer
        dialog = self.dialog + [{"role": "user", "content": text}]
        if prefill:
            ids = tok.encode_dialog(dialog + [{"role": "assistant", "content": prefill}], continue_final_message=True)
        else:
            ids = tok.encode_dialog(dialog)
        if len(ids) >= llama.max_seq_len:
            raise LlamaMinError(f"the dialog is {len(ids)} tokens, the window {llama.max_seq_len}: /reset to start over")
        total = min(llama.max_seq_len, len(ids) + max_gen_len)
        self._ensure_cache(total)
        llama.stats, start, reply = Stats(), time.perf_counter(), []
        llama.stats.stop_reasons = ["max-new-tokens" if len(ids) + max_gen_len <= total else "window full"]
        try:
            with unchanged_model(llama.step):  # the C step checks the model once, not every token
                logits = self._prefill(ids)
                llama.stats.prefill_s = elapsed(start, llama.device)
                while len(self.cached) < total:
                    penalised = self.sampling.repetition_penalty != 1
                    history = torch.tensor([self.cached], device=llama.device) if penalised else None
                    nxt = sample_next(llama.known_tokens(logits[:, -1]), self.sampling, history, self.generator)
                    nxt = int((broadcast_from_rank0(nxt) if llama.tensor_parallel else nxt)[0])  # rank 0 decides
                    if nxt in tok.stop_ids:
                        llama.stats.stop_reasons = ["end of turn"]
                        break
                    reply.append(nxt)
                    if on_token is not None:
                        on_token(nxt)
                    logits = llama.step(torch.tensor([[nxt]], device=llama.device), len(self.cached), last_only=True)
                    self.cached.append(nxt)
        finally:  # also on Ctrl-C: keep what was said
            llama.stats.new_tokens = len(reply)
            llama.stats.decode_s = elapsed(start, llama.device) - llama.stats.prefill_s
            self.dialog = dialog + [{"role": "assistant", "content": prefill + tok.decode(reply)}]
        return self.dialog[-1]["content"]
