"""Conversations kept by the server: their messages, per (tenant, user), bounded.

A conversation belongs to the user who started it: the key includes the tenant
and the user, so another user naming the same id gets their own, empty one,
and a user who reconnects continues where they left off. Each owner keeps at
most ``limits.max_conversations``; the least recently used goes first.

Surfaces read a conversation with :meth:`Conversations.history` and add a turn
with :meth:`Conversations.append` once it is answered (at once, no await: a
turn that overlaps another commits its own messages only). A conversation
holds at most ``limits.max_conversation_bytes`` of text and images: past it
its oldest messages go (:func:`bounded`), as a model's context would drop them
anyway; a prompt shows a vision model the newest images only
(:func:`newest_images`). This process keeps
them (:class:`ConversationStore`) unless ``[state] url`` names a Redis shared
by the nodes (:mod:`gateway.redisconversations`), where a conversation started
on one node continues on another.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from engine import ChatMessage as EngineMessage

__all__ = [
    "Conversation",
    "ConversationStore",
    "Conversations",
    "Owner",
    "ResponseStore",
    "StoredResponse",
    "bounded",
    "message_bytes",
    "newest_images",
]

Owner = tuple[str | None, str]


def message_bytes(msg: EngineMessage) -> int:
    """What ``msg`` weighs in a conversation: its text, calls and images, encoded."""
    calls = sum(len(c.name) + len(c.arguments) + len(c.id) for c in msg.tool_calls or ())
    images = sum(len(x) for x in msg.images or ())
    return len(msg.content.encode("utf-8")) + calls + images + 16


def bounded(messages: Sequence[EngineMessage], max_bytes: int) -> slice:
    """The oldest of ``messages`` that go so the rest weigh at most ``max_bytes``: a
    span after the leading ``system`` messages (the conversation's instructions stay),
    never the newest (it was just said, whatever it weighs)."""
    first = 0
    while first < len(messages) - 1 and messages[first].role == "system":
        first += 1
    total = sum(message_bytes(x) for x in messages)
    end = first
    while total > max_bytes and end < len(messages) - 1:
        total -= message_bytes(messages[end])
        end += 1
    return slice(first, end)


def newest_images(messages: Sequence[EngineMessage], keep: int) -> list[EngineMessage]:
    """``messages`` with the images of older turns left out past the newest ``keep``
    (their text stays): what a prompt of a long illustrated conversation shows."""
    out: list[EngineMessage] = []
    left = keep
    for x in reversed(messages):
        if x.images:
            shown = x.images[max(0, len(x.images) - left) :] if left > 0 else []
            left -= len(shown)
            if len(shown) != len(x.images):
                x = msgspec.structs.replace(x, images=shown or None)
        out.append(x)
    out.reverse()
    return out


class Conversation:
    """One conversation: its model and the messages of its committed turns."""

    __slots__ = ("messages", "model")

    def __init__(self, model: str) -> None:
        self.model = model
        self.messages: list[EngineMessage] = []


class Conversations(Protocol):
    """Where conversations are kept (see the module)."""

    async def history(self, owner: Owner, conv_id: str, model: str) -> Conversation:
        """Conversation ``conv_id`` of ``owner`` (a new, empty one when unknown)."""

    def append(self, owner: Owner, conv_id: str, messages: list[EngineMessage]) -> None:
        """Add an answered turn's messages, in order (kept before the next history)."""

    async def forget(self, owner: Owner, conv_id: str) -> bool:
        """Drop a conversation; whether there was one."""

    async def close(self) -> None: ...


class ConversationStore:
    """Conversations per (tenant, user) in this process, least recently used dropped
    beyond a bound."""

    def __init__(self, max_per_user: int, max_bytes: int = 8 * 1024 * 1024) -> None:
        self._max = max_per_user
        self._max_bytes = max_bytes
        self._by_owner: dict[tuple[str | None, str], OrderedDict[str, Conversation]] = {}

    def get_or_create(
        self, owner: tuple[str | None, str], conv_id: str, model: str
    ) -> Conversation:
        convs = self._by_owner.setdefault(owner, OrderedDict())
        conv = convs.get(conv_id)
        if conv is None:
            conv = Conversation(model)
            convs[conv_id] = conv
            while len(convs) > self._max:
                convs.popitem(last=False)
        convs.move_to_end(conv_id)
        return conv

    async def history(self, owner: Owner, conv_id: str, model: str) -> Conversation:
        return self.get_or_create(owner, conv_id, model)

    def append(self, owner: Owner, conv_id: str, messages: list[EngineMessage]) -> None:
        conv = self._by_owner.get(owner, OrderedDict()).get(conv_id)
        if conv is not None:  # (dropped meanwhile as least recently used: nothing to keep)
            conv.messages.extend(messages)
            del conv.messages[bounded(conv.messages, self._max_bytes)]

    async def forget(self, owner: Owner, conv_id: str) -> bool:
        return self._by_owner.get(owner, OrderedDict()).pop(conv_id, None) is not None

    async def close(self) -> None:
        return None


class StoredResponse:
    """A Responses API answer kept for ``previous_response_id`` and ``GET``.

    ``messages`` is the whole conversation up to and including this answer
    (its text and calls), without the request's ``instructions``, which do not
    carry over to the next response.
    """

    __slots__ = ("body", "messages")

    def __init__(self, body: dict[str, Any], messages: list[EngineMessage]) -> None:
        self.body = body
        self.messages = messages


class ResponseStore:
    """Stored responses per (tenant, user), least recently used dropped beyond a bound."""

    def __init__(self, max_per_user: int) -> None:
        self._max = max_per_user
        self._by_owner: dict[tuple[str | None, str], OrderedDict[str, StoredResponse]] = {}

    def put(self, owner: tuple[str | None, str], response_id: str, entry: StoredResponse) -> None:
        kept = self._by_owner.setdefault(owner, OrderedDict())
        kept[response_id] = entry
        kept.move_to_end(response_id)
        while len(kept) > self._max:
            kept.popitem(last=False)

    def get(self, owner: tuple[str | None, str], response_id: str) -> StoredResponse | None:
        kept = self._by_owner.get(owner)
        entry = kept.get(response_id) if kept is not None else None
        if entry is not None and kept is not None:
            kept.move_to_end(response_id)
        return entry

    def delete(self, owner: tuple[str | None, str], response_id: str) -> bool:
        return self._by_owner.get(owner, OrderedDict()).pop(response_id, None) is not None
