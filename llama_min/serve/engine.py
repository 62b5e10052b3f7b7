"""Engine: many requests on one Llama at once, each streamed token by token (continuous batching).

    engine = Engine(llama, max_batch=8).start()
    handle = engine.submit(Request(prompt_ids, max_tokens=64, temperature=0))
    for event in handle:          # TokenEvent per generated token, then one DoneEvent
        ...
    engine.stop()

The loop (a background thread after start(); `step()` runs one round, for tests and callers without a
thread), every round:

  1. requests whose handle was cancelled end ("abort"): a waiting one leaves the queue, a running one frees
     its row now
  2. admission: when a row is free, the oldest waiting request joins. Its prompt's longest prefix held by
     the prefix cache (whole blocks; at least the last prompt token is always computed, for its logits) is
     copied into the row, the rest is prefilled alone (the model's own step, one request at a time), the
     prompt's whole blocks go into the prefix cache, and its first token is sampled
  3. decode: every running row feeds its last token at its own position, all rows in one batched step
     (runner.py); each samples its next token
  4. rows that sampled a stop id, reached max_tokens or the window end ("stop" / "length"): their tokens'
     K/V go into the prefix cache (the next turn of a chat resends them) and the row is freed

Sampling per request: greedy (argmax) at temperature 0, else decoding.sampling's softmax(logits / T) +
Meta's top-p with the request's own generator (seeded by `seed`), so a request's tokens do not depend on
which others share its batch. Ids past the tokenizer's vocabulary (a padded embedding table) never come.

Threads: submit() and Handle.cancel() from any thread; the model runs only on the engine's thread, which
owns the Llama (its KV caches) from start() to stop(): do not call llama.generate meanwhile.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, List, Optional

import torch

from ..decoding.sampling import Sampling, sample_next
from ..errors import LlamaMinError
from ..runtime.memory import free_memory
from .prefix_cache import BLOCK_SIZE, PrefixCache
from .runner import Runner
from .scheduler import QueueFull, Scheduler
from .sequence import DoneEvent, Handle, Request, Sequence, TokenEvent

__all__ = ["Engine", "Request", "Handle", "TokenEvent", "DoneEvent", "QueueFull", "default_cache_bytes"]

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def default_cache_bytes(device) -> int:
    """The prefix cache's default budget: a quarter of the device's free memory, at most 4 GiB (256 MiB when
    the free memory is unknown)."""
    free = free_memory(device)
    return 256 * 2**20 if free is None else min(free // 4, 4 * 2**30)


class Engine:
    """Continuous batching over one generation.Llama (module docstring).

    max_batch: rows decoded together; cache_bytes: the prefix cache's budget (None = default_cache_bytes,
    0 = no prefix cache); max_queue: requests that may wait for a row (submit raises QueueFull past it);
    block_size: tokens per prefix-cache block."""

    def __init__(self, llama, max_batch: int = 8, cache_bytes: Optional[int] = None, max_queue: int = 64,
                 block_size: int = BLOCK_SIZE):
        if getattr(llama, "tensor_parallel", False):
            raise LlamaMinError("the serving engine runs one process: build the model without tensor_parallel")
        self.llama = llama
        self.max_len = llama.max_seq_len
        self.scheduler = Scheduler(max_batch, max_queue)
        self.runner = Runner(llama, max_batch)
        budget = default_cache_bytes(llama.device) if cache_bytes is None else cache_bytes
        self.prefix_cache = PrefixCache(budget, block_size)
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.error: Optional[BaseException] = None  # what ended the loop, if it failed

    # ---------------------------------------------------------------------------------------- public

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> dict:
        """Counts for a health or metrics endpoint."""
        pc = self.prefix_cache
        return {"running": self.running, "waiting": self.waiting, "max_batch": self.scheduler.max_batch,
                "prefix_cache_blocks": len(pc), "prefix_cache_bytes": pc.bytes, "prefix_cache_budget": pc.budget,
                "prefix_cache_hit_tokens": pc.hit_tokens}

    def submit(self, request: Request, on_event: Optional[Callable] = None) -> Handle:
        """Queue a request; its events arrive through the returned Handle. Raises QueueFull when max_queue
        requests wait, LlamaMinError for a request that cannot run (empty or too long prompt, bad ids or
        settings). on_event: called from the engine's thread with each event (optional)."""
        stop_ids = self._check(request)
        handle = Handle(on_event)
        self.scheduler.add(Sequence(request, handle, stop_ids, self.llama.device))
        return handle

    def start(self) -> "Engine":
        """Run the loop in a background thread (daemon)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama-min-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the loop; every open request (waiting or running) ends with finish_reason "abort"."""
        self._stopping.set()
        self.scheduler.closed = True  # (under no lock: a submit racing with it is aborted below or by the loop)
        self.scheduler.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # the step in progress finishes, then the loop aborts what is left
        self._abort_all()
        self.runner.release()

    @torch.inference_mode()
    def step(self) -> bool:
        """One round of the loop (module docstring); True while requests remain (waiting or running)."""
        sched = self.scheduler
        for seq in sched.take_cancelled_waiting():
            self._finish(seq, "abort")
        for seq in [s for s in sched.running if s.handle.cancelled]:
            self._finish(seq, "abort")
        seq = sched.next_to_admit()
        if seq is not None:
            self._admit(seq)
        if sched.running:
            self._decode()
        return sched.has_work()

    # ---------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.step():
                    self.scheduler.wait_for_work(0.5)
        except BaseException as err:  # the model failed: end every request rather than hang its client
            self.error = err
            log.exception("serving engine stopped")
        finally:
            self._abort_all()
            self.runner.release()

    def _abort_all(self) -> None:
        for seq in self.scheduler.close() + list(self.scheduler.running):
            self._finish(seq, "abort")

    def _admit(self, seq: Sequence) -> None:
        """Give a waiting request a row: cached prefix in, prefill the rest, sample its first token."""
        sched = self.scheduler
        if seq.request.max_tokens == 0:
            self._finish(seq, "length")
            return
        seq.slot = len(sched.running)
        sched.running.append(seq)
        prompt = seq.tokens
        blocks = self.prefix_cache.match(prompt, len(prompt) - 1)
        if blocks:
            self.runner.write_kv(seq.slot, 0, torch.cat([b.kv for b in blocks], dim=2))
        seq.cached = len(blocks) * self.prefix_cache.block_size
        logits = self.runner.prefill(seq.slot, prompt[seq.cached:], seq.cached)
        seq.n_kv = len(prompt)
        self._keep_prefix(seq)
        self._advance(seq, logits)

    def _decode(self) -> None:
        running = list(self.scheduler.running)  # row b is in slot b
        logits = self.runner.decode([s.pending for s in running], [len(s.tokens) - 1 for s in running])
        for seq in running:  # every row's K/V are written before any row may end (and another move)
            seq.n_kv = len(seq.tokens)
        for seq, row in zip(running, logits):
            self._advance(seq, row)

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the next token of a running row from its logits (V,); send it, or end the row."""
        req = seq.request
        logits = self.llama.known_tokens(logits[None].float())  # (1, V)
        token = int(sample_next(logits, seq.sampling, None, seq.generator))  # (argmax at temperature 0)
        if token in seq.stop_ids:
            return self._finish(seq, "stop")
        logprobs = torch.log_softmax(logits[0], dim=-1)
        top = []
        if req.top_logprobs:
            values, ids = torch.topk(logprobs, req.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        seq.tokens.append(token)
        seq.handle.put(TokenEvent(token, float(logprobs[token]), top))
        if seq.generated >= req.max_tokens or len(seq.tokens) >= self.max_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End a request: keep its K/V prefix, free its row (the last row moves into it), send DoneEvent."""
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        running = self.scheduler.running
        if seq.slot is not None and seq in running:
            self._keep_prefix(seq)
            last = running[-1]
            if last is not seq:
                self.runner.move(last.slot, seq.slot, last.n_kv)
                running[seq.slot], last.slot = last, seq.slot
            running.pop()
            seq.slot = None
        seq.handle.put(seq.done_event())

    def _keep_prefix(self, seq: Sequence) -> None:
        """The whole blocks of the row's tokens that have K/V go into the prefix cache."""
        if self.prefix_cache.budget > 0:
            self.prefix_cache.insert(seq.tokens, seq.n_kv, lambda a, b: self.runner.read_kv(seq.slot, a, b))

    def _check(self, req: Request) -> set:
        """Validate a request (LlamaMinError naming the field); returns its stop ids."""
        ids, vocab = req.prompt_ids, self.llama.model.vocab_size
        if not ids:
            raise LlamaMinError("empty prompt: give at least one token")
        if len(ids) >= self.max_len:
            raise LlamaMinError(f"prompt of {len(ids)} tokens leaves no room in the window of {self.max_len}")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise LlamaMinError(f"prompt token ids must be integers in [0, {vocab})")
        if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 0:
            raise LlamaMinError(f"max_tokens: {req.max_tokens!r}; expected an integer >= 0")
        if not isinstance(req.top_logprobs, int) or not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise LlamaMinError(f"top_logprobs: {req.top_logprobs!r}; expected 0 .. {MAX_TOP_LOGPROBS}")
        Sampling(req.temperature, req.top_p)  # checks both
        return set(self.llama.tokenizer.stop_ids if req.stop_ids is None else req.stop_ids)


def collect_tokens(handle: Handle) -> List[int]:
    """The generated ids of a finished handle (blocking)."""
    return [e.token_id for e in handle.collect()[0]]
