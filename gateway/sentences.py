"""Streamed answer text cut into pieces a voice can speak as soon as each is complete.

A spoken reply starts when its first sentence is complete, not when the
answer is: :class:`Sentences` takes text as it streams and gives back each
sentence once its end is seen (``.``, ``!``, ``?`` or ``…`` before a space,
or a line break). The first piece is cut sooner, so the first audio comes
sooner: at a clause (a comma, colon or semicolon) once it is long enough to
be worth saying alone, else at a space past ``first_max_chars``. A run-on
sentence is cut at its last space before ``max_chars``. :func:`speakable` drops what should not be read aloud
(markdown marks, code fences, URLs). Pure, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Sentences", "speakable"]

_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s)|\n+")
_CLAUSE = re.compile(r"[,;:](?=\s)")
_MARKS = re.compile(r"```.*?(```|\Z)|`|\*\*?|__?|^#+\s*|^\s*[-*+]\s+|https?://\S+", re.S | re.M)


def speakable(text: str) -> str:
    """``text`` as a voice should read it: markdown marks, code and links left out."""
    return re.sub(r"\s+", " ", _MARKS.sub(" ", text)).strip()


@dataclass
class Sentences:
    """Cuts streamed text into speakable pieces (see the module)."""

    first_clause_chars: int = 12  # the first piece may end at a clause past this length
    first_max_chars: int = 28  # ... and ends at a space past this one (about five words)
    max_chars: int = 240  # a longer piece is cut at a space
    _buffer: str = ""
    _given: int = 0  # pieces given so far
    _done: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[str]:
        """Pieces completed by ``text`` (possibly none)."""
        self._buffer += text
        out: list[str] = []
        while True:
            piece = self._next()
            if piece is None:
                return out
            if piece:
                out.append(piece)
                self._given += 1

    def flush(self) -> list[str]:
        """What is left at the end of the answer (a last piece without its full stop)."""
        rest, self._buffer = speakable(self._buffer), ""
        if rest:
            self._given += 1
            return [rest]
        return []

    def _next(self) -> str | None:
        buf = self._buffer
        end = _END.search(buf)
        cut = end.end() if end else None
        if cut is None and self._given == 0:
            clause = None
            for match in _CLAUSE.finditer(buf):
                if match.end() >= self.first_clause_chars:
                    clause = match
                    break
            if clause is not None:
                cut = clause.end()
        limit = self.first_max_chars if self._given == 0 else self.max_chars
        if cut is None and len(buf) > limit:
            space = buf.rfind(" ", 0, limit)
            cut = space if space > 0 else limit
        if cut is None:
            return None
        piece, self._buffer = buf[:cut], buf[cut:].lstrip()
        return speakable(piece)
