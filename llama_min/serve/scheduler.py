"""Which requests wait and which run: a bounded waiting queue (FIFO) and the running rows.

Continuous batching (as in vLLM / nano-vllm): the engine asks at every decode step whether a waiting
request can join (a free row), and a row leaves the moment its request ends, so short answers never wait
for long ones. Thread safety: `add` and `cancel_waiting` are called from the clients' threads, everything
else from the engine's; one lock guards the waiting queue, and `wake` is the condition the engine sleeps on.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import List, Optional

from ..errors import LlamaMinError
from .sequence import Sequence


class QueueFull(Exception):
    """submit() refused: max_queue requests are already waiting (an HTTP server answers 429/503)."""


class Scheduler:
    """waiting: a FIFO of at most max_queue Sequences; running: at most max_batch, row i in slot i."""

    def __init__(self, max_batch: int, max_queue: int):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque = deque()
        self.running: List[Sequence] = []
        self.wake = threading.Condition()
        self.closed = False  # set by close(): add() refuses from then on

    def add(self, seq: Sequence) -> None:
        """Queue a request (any thread); QueueFull when max_queue wait already, LlamaMinError once closed."""
        with self.wake:
            if self.closed:
                raise LlamaMinError("the engine is stopped: it takes no more requests")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            self.waiting.append(seq)
            self.wake.notify()

    def take_cancelled_waiting(self) -> List[Sequence]:
        """Remove and return the waiting requests whose handle was cancelled."""
        with self.wake:
            gone = [s for s in self.waiting if s.handle.cancelled]
            for s in gone:
                self.waiting.remove(s)
        return gone

    def next_to_admit(self) -> Optional[Sequence]:
        """The oldest waiting request when a row is free (removed from the queue), else None."""
        with self.wake:
            if len(self.running) >= self.max_batch or not self.waiting:
                return None
            return self.waiting.popleft()

    def close(self) -> List[Sequence]:
        """Refuse new requests from now on; remove and return the waiting ones."""
        with self.wake:
            self.closed = True
            out = list(self.waiting)
            self.waiting.clear()
        return out

    def has_work(self) -> bool:
        with self.wake:
            return bool(self.waiting or self.running)

    def wait_for_work(self, timeout: float) -> None:
        """Sleep (engine thread) until a request arrives or `timeout` seconds pass."""
        with self.wake:
            if not self.waiting and not self.running:
                self.wake.wait(timeout)

    def notify(self) -> None:
        with self.wake:
            self.wake.notify_all()
