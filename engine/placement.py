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

Raw prompts (completions, WebSocket ``generate``) are named by their text in
blocks of :data:`BLOCK` characters: a prompt is remembered by digests of its
prefixes at a few block boundaries (the longest, and 1, 2, 4, 8, 16, 32 blocks),
and a later prompt prefers the worker of its longest remembered prefix: a
continuation (the prompt, its completion, more text) or a shared opening.
Prompts shorter than a block are not placed (little to reuse).

Pure and bounded: an LRU of ``capacity`` digests; no text is stored.
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


BLOCK = 256  # characters of a raw prompt per digest
MAX_BLOCKS = 64  # raw prompts are matched on at most this many blocks (16 KiB of text)
_KEPT_BLOCKS = (1, 2, 4, 8, 16, 32)  # shared openings remembered besides the longest


def _prompt_keys(model: str, prompt: str) -> list[bytes]:
    """Digests of ``prompt``'s prefixes of 1, 2, ... whole blocks (at most MAX_BLOCKS)."""
    h = hashlib.blake2b(model.encode() + b"\x02", digest_size=16)
    keys = []
    for i in range(min(len(prompt) // BLOCK, MAX_BLOCKS)):
        h.update(prompt[i * BLOCK : (i + 1) * BLOCK].encode("utf-8", "replace"))
        keys.append(h.copy().digest())
    return keys


class Affinity:
    """Remembers which worker served which conversation prefix."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._where: OrderedDict[bytes, int] = OrderedDict()

    def preferred(self, request: GenerateRequest) -> int | None:
        """The worker holding the longest remembered prefix of ``request``'s messages
        (or of its raw prompt's text)."""
        messages = request.messages
        if not messages:
            for key in reversed(_prompt_keys(request.model, request.prompt or "")):
                found = self._where.get(key)
                if found is not None:
                    return found
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
        """``worker`` read ``request``'s messages (or prompt): later turns should go there."""
        if request.messages:
            self._remember(_digest(request.model, request.messages), worker)
            return
        keys = _prompt_keys(request.model, request.prompt or "")
        for n in (*(k for k in _KEPT_BLOCKS if k < len(keys)), len(keys)):
            if n:
                self._remember(keys[n - 1], worker)

    def _remember(self, key: bytes, worker: int) -> None:
        self._where[key] = worker
        self._where.move_to_end(key)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)
