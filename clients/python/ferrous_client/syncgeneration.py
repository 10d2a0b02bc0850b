"""A generation of the blocking client: read from the connection while it is iterated.

Kept apart from :mod:`ferrous_client.sync` (the connection, its session and
resumption): a :class:`SyncGeneration` only asks its owner for its next item
and tells it what was read, cancelled or dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Protocol, Self

from ferrous_client.errors import FerrousClientError
from ferrous_client.generation import GenerationState
from ferrous_client.protocol import messages as m
from ferrous_client.wire import utf8_len

__all__ = ["GenerationOwner", "SyncGeneration"]


class GenerationOwner(Protocol):
    """What a generation needs of the client that reads its connection."""

    def _receive_for(self, gen: SyncGeneration) -> m.Delta | m.Done | FerrousClientError: ...

    def _consumed(self, n: int) -> None: ...

    def _send_cancel(self, gen: SyncGeneration) -> None: ...

    def _abandon(self, gen: SyncGeneration) -> None: ...


class SyncGeneration(GenerationState):
    """One generation: an iterable of :class:`Delta` messages, read from the connection.

    After the iteration ends, ``done`` holds the :class:`Done` message and
    ``conversation`` the conversation id. A ``done`` with finish reason
    ``error`` raises :class:`EngineError`, ``stalled`` :class:`Stalled`.
    """

    def __init__(
        self, client: GenerationOwner, gen_id: str, model: str, conversation: str | None
    ) -> None:
        super().__init__(gen_id, model, conversation)
        self._client = client

    def __iter__(self) -> Iterator[m.Delta]:
        return self._iterate()

    def _iterate(self) -> Iterator[m.Delta]:
        if self._iterating:
            raise RuntimeError(f"generation {self.id} is already being iterated")
        self._iterating = True
        try:
            while (delta := self._next()) is not None:
                yield delta
        finally:
            self._iterating = False
            if not self._exhausted:
                self.close()

    def _next(self) -> m.Delta | None:
        if self._exhausted or self._abandoned:
            return None
        item = self._client._receive_for(self)
        if isinstance(item, m.Delta):
            self._client._consumed(utf8_len(item.text))
            return item
        self._read_end(item)
        return None

    def collect(self) -> str:
        """Read the generation to its end and return its whole text (after a restart,
        that of the run that finished: deltas count from seq 0 again)."""
        parts: list[str] = []
        for delta in self:
            if delta.seq == 0:
                parts.clear()
            parts.append(delta.text)
        return "".join(parts)

    def cancel(self) -> None:
        """Ask the server to stop; the iteration then ends with finish reason ``cancelled``."""
        if not self._ended:
            self._client._send_cancel(self)

    def close(self) -> None:
        """Stop reading: cancel the generation if it is running and drop what still comes."""
        if self._abandoned or self._exhausted:
            return
        self._abandoned = True
        self._client._abandon(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
