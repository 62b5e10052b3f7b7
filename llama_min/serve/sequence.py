"""One request's life in the engine: what a client asks (Request), what it gets back (TokenEvent per
generated token, then one DoneEvent, through its Handle), and the engine's state for it (Sequence).

Handle: iterate it (blocking) to read the events in order; iteration ends after the DoneEvent. The events
also sit in a thread-safe queue.Queue (`handle.events()`), for a consumer that prefers to poll or to read
them from another event loop (e.g. asyncio via run_in_executor); read either, not both.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from ..decoding.sampling import Sampling

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Request:
    """A completion request in token ids.

    max_tokens: at most this many generated tokens (the stop token not counted); temperature 0 = greedy;
    top_p: Meta's nucleus rule (decoding/sampling.py); seed: a private generator for this request (None = a
    random seed); stop_ids: token ids that end it (None = the tokenizer's stop ids); top_logprobs: how many
    most likely tokens (id, logprob) each TokenEvent lists (0 = none)."""

    prompt_ids: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_ids: Optional[set] = None
    top_logprobs: int = 0


@dataclass
class TokenEvent:
    """One generated token: its id, log p(token) under the model's distribution (log_softmax of the logits,
    before temperature and top-p), and the top_logprobs most likely (id, logprob) pairs, best first."""

    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class DoneEvent:
    """The last event of a request. finish_reason: "stop" (a stop id was sampled; it is not sent),
    "length" (max_tokens, or the context window is full), "abort" (cancelled, or the engine stopped).
    prompt_tokens: the prompt's length; cached_tokens: how many of them came from the prefix cache (not
    computed again); completion_tokens: the TokenEvents sent."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


class Handle:
    """What Engine.submit returns: the request's events, and cancel().

    Iterating blocks until each next event; it ends after the DoneEvent. cancel() asks the engine to end the
    request: its row is freed at the next step and a DoneEvent("abort") follows. `on_event` (optional, given
    to submit) is called from the engine's thread with each event as it is produced, before it is queued."""

    def __init__(self, on_event: Optional[Callable] = None):
        self._queue: "queue.Queue" = queue.Queue()
        self._cancelled = threading.Event()
        self._on_event = on_event
        self.done: Optional[DoneEvent] = None  # set when the DoneEvent is sent

    def events(self) -> "queue.Queue":
        """The thread-safe queue the events arrive in (the same ones iteration yields)."""
        return self._queue

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, event) -> None:
        """Engine side: deliver one event."""
        if isinstance(event, DoneEvent):
            self.done = event
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a client's callback must not stop the engine for everyone
                log.exception("on_event callback failed")
        self._queue.put(event)

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, DoneEvent):
                return

    def collect(self) -> Tuple[List[TokenEvent], DoneEvent]:
        """Wait for the whole answer: (its TokenEvents, the DoneEvent)."""
        tokens = list(self)
        return tokens[:-1], tokens[-1]


class Sequence:
    """The engine's state for one request.

    tokens: prompt + generated ids (the last one may still be pending: sampled, not yet fed to the model);
    n_kv: how many of `tokens` have their keys/values in the row's slot; slot: the row of the running batch
    (None while waiting); cached: prompt tokens taken from the prefix cache."""

    def __init__(self, request: Request, handle: Handle, stop_ids: set, device):
        self.request, self.handle, self.stop_ids = request, handle, stop_ids
        self.tokens: List[int] = list(request.prompt_ids)
        self.n_prompt = len(request.prompt_ids)
        self.n_kv = 0
        self.slot: Optional[int] = None
        self.cached = 0
        self.finish_reason: Optional[str] = None
        self.sampling = Sampling(request.temperature, request.top_p)
        seed = request.seed if request.seed is not None else secrets.randbits(62)  # (torch's global RNG untouched)
        self.generator = torch.Generator(device).manual_seed(seed) if request.temperature > 0 else None

    @property
    def generated(self) -> int:
        """TokenEvents sent: the tokens after the prompt."""
        return len(self.tokens) - self.n_prompt

    @property
    def pending(self) -> int:
        """The last token, not yet fed to the model."""
        return self.tokens[-1]

    def done_event(self) -> DoneEvent:
        return DoneEvent(self.finish_reason, self.n_prompt, self.cached, self.generated)
