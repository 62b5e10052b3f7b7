"""Stop strings: end a row when its generated *text* contains one of the given strings.

Token ids and text do not line up: "\n\n" may be one token, or the end of one token and the start of the
next, and a stop string may be a prefix of what is still to come. So each row's new tokens are decoded
as a stream (whole UTF-8 characters only, see tokenizer.StreamDecoder), appended to the row's text, and
searched for every stop string. Text that might still become a stop string (a suffix of the text that is
a prefix of a stop string) is held back, so a stop string is never streamed; what comes before it is.
"""

from __future__ import annotations

from typing import Callable, Optional


class StopStrings:
    """Per-row text of a batch's new tokens; `push` says when a stop string has appeared.

    tok: a tokenizer with `stream_decoder()`; stops: the strings (empty = only stream the text);
    on_text(row, text): called with each piece of text that is safe to show.
    """

    def __init__(self, tok, stops, batch_size: int, on_text: Optional[Callable[[int, str], None]] = None):
        self.stops = [s for s in (stops or []) if s]
        self.decoders = [tok.stream_decoder() for _ in range(batch_size)]
        self.texts = [""] * batch_size  # each row's decoded text so far
        self.shown = [0] * batch_size  # characters of it handed to on_text
        self.cut: list = [None] * batch_size  # where a row's text ends (before its stop string)
        self.on_text = on_text

    def push(self, row: int, token_id: int) -> bool:
        """Add one token to a row's text; True when the row's text now contains a stop string."""
        if self.cut[row] is not None:
            return True
        before = len(self.texts[row])
        self.texts[row] += self.decoders[row].push(token_id)
        text = self.texts[row]
        longest = max((len(s) for s in self.stops), default=0)
        window = max(0, before - longest + 1)  # a new match must end inside the new text
        hits = [i for i in (text.find(s, window) for s in self.stops) if i >= 0]
        if hits:
            self.cut[row] = min(hits)
        self._show(row, final=bool(hits))
        return bool(hits)

    def finish(self, row: int) -> str:
        """A row has ended: flush its decoder, show the rest; returns the row's final text."""
        if self.cut[row] is None:
            self.texts[row] += self.decoders[row].flush()
        self._show(row, final=True)
        return self.text(row)

    def text(self, row: int) -> str:
        """The row's text up to (not including) its stop string."""
        cut = self.cut[row]
        return self.texts[row] if cut is None else self.texts[row][:cut]

    def _show(self, row: int, final: bool):
        if self.on_text is None:
            return
        text = self.text(row)
        end = len(text) if final else len(text) - self._held_back(text)
        if end > self.shown[row]:
            self.on_text(row, text[self.shown[row]:end])
            self.shown[row] = end

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0
