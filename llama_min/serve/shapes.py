"""OpenAI's response shapes: a whole answer, or the chunks of a stream, for chat and for completions.

A shape is built per request and turns the text pieces and token logprobs the app collects into JSON:
`whole(text, logprobs, outcome)` for a plain answer; `opening()`, `delta(piece)`, `finish(outcome)`,
`usage_chunk(outcome)` for a stream. Logprob entries are the engine's TokenEvents (token_id, logprob, top).
"""

from __future__ import annotations

import time
import uuid
from typing import Optional


class ChatShape:
    """/v1/chat/completions: `chat.completion` and `chat.completion.chunk` objects."""

    prefix, obj, chunk_obj = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tok, model_id: str, logprobs: Optional[int]):
        self.tok, self.model_id, self.logprobs = tok, model_id, logprobs
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id}

    def whole(self, text: str, events: list, outcome) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": self.logprob_block(events), "finish_reason": outcome.finish_reason}
        return {**self.head(self.obj), "choices": [choice], "usage": outcome.usage()}

    def opening(self) -> list:
        return [self.chunk({"role": "assistant", "content": ""})]

    def delta(self, piece) -> dict:
        return self.chunk({"content": piece.text}, logprobs=self.logprob_block(piece.logprobs))

    def finish(self, outcome) -> dict:
        return self.chunk({}, finish_reason=outcome.finish_reason)

    def usage_chunk(self, outcome) -> dict:
        return {**self.head(self.chunk_obj), "choices": [], "usage": outcome.usage()}

    def chunk(self, delta: dict, logprobs=None, finish_reason=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.head(self.chunk_obj), "choices": [choice]}

    def logprob_block(self, events: list) -> Optional[dict]:
        """{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]} (None without logprobs)."""
        if self.logprobs is None:
            return None
        return {"content": [dict(self.entry(e.token_id, e.logprob),
                                 top_logprobs=[self.entry(i, lp) for i, lp in (e.top or [])][:self.logprobs])
                            for e in events]}

    def entry(self, token_id: int, logprob: float) -> dict:
        text = self.tok.decode([token_id])
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}


class CompletionShape(ChatShape):
    """/v1/completions: `text_completion` objects (the stream's chunks are `text_completion` too)."""

    prefix, obj, chunk_obj = "cmpl", "text_completion", "text_completion"

    def __init__(self, tok, model_id: str, logprobs: Optional[int]):
        super().__init__(tok, model_id, logprobs)
        self.offset = 0  # characters of text sent so far (text_offset of the next token)

    def whole(self, text: str, events: list, outcome) -> dict:
        choice = {"index": 0, "text": text, "logprobs": self.logprob_block(events),
                  "finish_reason": outcome.finish_reason}
        return {**self.head(self.obj), "choices": [choice], "usage": outcome.usage()}

    def opening(self) -> list:
        return []

    def delta(self, piece) -> dict:
        return self.chunk(piece.text, logprobs=self.logprob_block(piece.logprobs))

    def finish(self, outcome) -> dict:
        return self.chunk("", finish_reason=outcome.finish_reason)

    def chunk(self, text: str, logprobs=None, finish_reason=None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.head(self.chunk_obj), "choices": [choice]}

    def logprob_block(self, events: list) -> Optional[dict]:
        """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} (None without logprobs)."""
        if self.logprobs is None:
            return None
        tokens = [self.tok.decode([e.token_id]) for e in events]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        tops = [{self.tok.decode([i]): float(lp) for i, lp in (e.top or [])[:self.logprobs]} for e in events]
        return {"tokens": tokens, "token_logprobs": [float(e.logprob) for e in events],
                "top_logprobs": tops if self.logprobs else None, "text_offset": offsets}
