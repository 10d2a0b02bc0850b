"""Reading tool calls out of a streamed answer (the syntax of :mod:`engine.tools`).

The model writes text, then zero or more blocks of
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``. A surface feeds
:class:`ToolCallReader` each piece of text as it arrives and gets back what it
can say already: answer text (held back only while it could be the start of
``<tool_call>``), the start of a call (its name, as soon as it is complete)
and its arguments in pieces (everything up to the last ``}`` seen, since the
call's own closing brace must not reach the client). That is the shape of
OpenAI's streamed ``delta.tool_calls`` (index, id and name first, then
argument fragments) and the official clients reassemble it. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from engine.tools import CALL_CLOSE, CALL_OPEN

__all__ = ["CallArguments", "CallStarted", "ReadCall", "TextPiece", "ToolCallReader", "new_call_id"]

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    """An id for a call, as OpenAI's look (``call_`` and 24 characters)."""
    return "call_" + secrets.token_urlsafe(18)


class TextPiece(msgspec.Struct, frozen=True):
    text: str


class CallStarted(msgspec.Struct, frozen=True):
    index: int
    id: str
    name: str


class CallArguments(msgspec.Struct, frozen=True):
    index: int
    text: str


Event = TextPiece | CallStarted | CallArguments


class ReadCall(msgspec.Struct, frozen=True):
    """A call as read in full: ``arguments`` is JSON text (complete unless the answer was cut)."""

    id: str
    name: str
    arguments: str

    def arguments_object(self) -> Any:
        """The arguments as a JSON value (Ollama sends objects); ``{}`` if they do not parse."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return {}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (and could complete it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallReader:
    """Splits streamed text into answer text and tool calls; see the module docstring."""

    def __init__(self, ids: Callable[[], str] = new_call_id) -> None:
        self._ids = ids
        self._buf = ""  # text not yet said
        self._in_call = False
        self._name: str | None = None
        self._args_from = 0  # where the arguments start in _buf
        self._said = 0  # argument characters already sent
        self.calls: list[ReadCall] = []
        self.text_parts: list[str] = []

    @property
    def text(self) -> str:
        """All answer text said so far (without the calls)."""
        return "".join(self.text_parts)

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Event]:
        """The answer ended: say what was held back (a call cut short keeps what it had)."""
        out: list[Event] = []
        if self._in_call:
            if self._name is not None:
                rest = self._buf[self._args_from + self._said :]
                if rest:
                    out.append(CallArguments(len(self.calls), rest))
                self._close(self._buf[self._args_from :])
            else:  # not even a name: it was text after all
                self._say(CALL_OPEN + self._buf, out)
        elif self._buf:
            self._say(self._buf, out)
        self._buf = ""
        self._in_call = False
        return out

    def _say(self, text: str, out: list[Event]) -> None:
        if self.calls and not text.strip():
            return  # whitespace between or after calls is not part of the answer
        self.text_parts.append(text)
        out.append(TextPiece(text))

    def _close(self, arguments: str) -> None:
        assert self._name is not None
        self.calls.append(ReadCall(self._call_id, self._name, arguments))
        self._name = None

    def _step(self, out: list[Event]) -> bool:
        """Advance as far as the buffer allows; True if another step may make progress."""
        if not self._in_call:
            at = self._buf.find(CALL_OPEN)
            if at < 0:
                keep = _partial_suffix(self._buf, CALL_OPEN)
                if len(self._buf) > keep:
                    self._say(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep :]
                return False
            if at:
                self._say(self._buf[:at], out)
            self._buf = self._buf[at + len(CALL_OPEN) :]
            self._in_call, self._name, self._said = True, None, 0
            return True
        if self._name is None:
            head = _HEAD.match(self._buf)
            if head is None:
                return False
            self._name = json.loads(f'"{head.group(1)}"')
            self._call_id = self._ids()
            self._args_from = head.end()
            out.append(CallStarted(len(self.calls), self._call_id, self._name))
        end = self._buf.find(CALL_CLOSE, self._args_from)
        body_end = end if end >= 0 else len(self._buf)
        # Up to the last "}" seen, exclusive: the call's own closing brace is never sent.
        last = self._buf.rfind("}", self._args_from, body_end)
        if end >= 0:
            arguments = self._buf[self._args_from : last if last >= 0 else body_end].rstrip()
        else:
            arguments = self._buf[self._args_from : last] if last >= 0 else ""
        if len(arguments) > self._said:
            out.append(CallArguments(len(self.calls), arguments[self._said :]))
            self._said = len(arguments)
        if end < 0:
            return False
        self._close(arguments)
        self._buf = self._buf[end + len(CALL_CLOSE) :]
        self._in_call = False
        return True
