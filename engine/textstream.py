"""Turning a stream of token bytes into text deltas.

Two things make this more than ``bytes.decode``:

* A character may span several tokens (byte-fallback vocabularies emit
  ``<0xE4> <0xBD> <0xA0>`` for 你). An incremental UTF-8 decoder holds the
  partial sequence until it completes, so every delta is valid UTF-8; bytes
  that can never complete become U+FFFD instead of leaking invalid UTF-8.
* A stop sequence may be split across tokens ("Obs" + "erver:"). Text that
  could still be the start of a stop sequence is held back until it either
  completes the stop sequence (the generation ends and the stop text is
  dropped) or cannot (the held text is released).

Pure: no I/O. The worker runs one :class:`TextStream` per generation.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["MAX_STOP_CHARS", "TextStream"]

MAX_STOP_CHARS = 256


class TextStream:
    """Feed token bytes, get text that is safe to show."""

    __slots__ = ("_decoder", "_hold", "_stops", "stopped")

    def __init__(self, stop: Sequence[str] = ()) -> None:
        for s in stop:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop sequences are limited to {MAX_STOP_CHARS} characters")
        self._stops = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._hold = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text that can be released now."""
        if self.stopped:
            return ""
        text = self._hold + self._decoder.decode(data)
        if not self._stops:
            self._hold = ""
            return text
        return self._scan(text)

    def flush(self) -> str:
        """End of generation: release held text (a partial stop never completed)."""
        if self.stopped:
            return ""
        text = self._hold + self._decoder.decode(b"", final=True)
        self._hold = ""
        if not self._stops:
            return text
        cut = self._earliest_stop(text)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text

    def _earliest_stop(self, text: str) -> int | None:
        best: int | None = None
        for s in self._stops:
            i = text.find(s)
            if i >= 0 and (best is None or i < best):
                best = i
        return best

    def _scan(self, text: str) -> str:
        cut = self._earliest_stop(text)
        if cut is not None:
            self.stopped = True
            self._hold = ""
            return text[:cut]
        keep = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        if keep:
            self._hold = text[-keep:]
            return text[:-keep]
        self._hold = ""
        return text
