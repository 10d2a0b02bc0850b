"""Which worker a request goes to when several have room: where its prefix already is.

A worker keeps the prompt prefixes of the sequences it ran in their slots
(engine.backends.llamacpp), so the next turn of a conversation reads only
the new messages *on that worker*; on another worker it reads the whole
history again. The gateway does not know token ids, so prefixes are named by
their messages: a chat's messages so far are remembered with the worker that
served them, and a request whose messages extend a remembered list (the
follow-up turn: the previous messages, the answer, a new question) prefers
that worker when it has room. Otherwise the least loaded worker with room
takes it, as before.

Pure and bounded: an LRU of ``capacity`` keys; nothing is stored about raw
prompts (a digest of each message list only).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from engine.requests import ChatMessage, GenerateRequest

__all__ = ["Affinity"]


def _digest(model: str, messages: Sequence[ChatMessage]) -> bytes:
    h = hashlib.blake2b(model.encode(), digest_size=16)
    for m in messages:
        h.update(b"\x00" + m.role.encode() + b"\x01" + m.content.encode("utf-8", "replace"))
    return h.digest()


class Affinity:
    """Remembers which worker served which conversation prefix."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._where: OrderedDict[bytes, int] = OrderedDict()

    def preferred(self, request: GenerateRequest) -> int | None:
        """The worker holding the longest remembered prefix of ``request``'s messages."""
        messages = request.messages
        if not messages:
            return None
        # The follow-up turn: everything but the answer and the new question, then
        # shorter prefixes (a retried turn, a shared opening).
        for cut in (2, 1, 3):
            if len(messages) > cut:
                found = self._where.get(_digest(request.model, messages[:-cut]))
                if found is not None:
                    return found
        return None

    def served(self, request: GenerateRequest, worker: int) -> None:
        """``worker`` read ``request``'s messages: later turns should go there."""
        if not request.messages:
            return
        key = _digest(request.model, request.messages)
        self._where[key] = worker
        self._where.move_to_end(key)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)
