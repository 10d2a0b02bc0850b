"""A generation of the async client: what the application iterates.

A :class:`Generation` reads from its own queue, which the client's reader
task fills with the generation's deltas, its done, or its error; the client
owns the connection, the generation only what the application sees. A
generation left early (``break``, an exception, ``aclose()``) asks the client
to cancel it and gives the text still queued back to flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Self

from ferrous_client.errors import ConnectionLost, EngineError, FerrousClientError, Stalled
from ferrous_client.protocol import messages as m
from ferrous_client.wire import utf8_len

if TYPE_CHECKING:
    from ferrous_client.client import FerrousClient

__all__ = ["Generation", "GenerationItem", "GenerationState", "finish_error"]

GenerationItem = m.Delta | m.Done | FerrousClientError
"""What the client hands a generation: text, its end, or its error."""


def finish_error(gen_id: str, done: m.Done) -> FerrousClientError | None:
    """The error a done implies: the generation failed rather than finished."""
    if done.finish_reason == "error":
        return EngineError("the generation ended with an engine error", generation_id=gen_id)
    if done.finish_reason == "stalled":
        return Stalled(
            "the server ended the generation: its text was not read in time", generation_id=gen_id
        )
    return None


class GenerationState:
    """What both clients' generations hold: ids, the server's events so far, and the end."""

    def __init__(self, gen_id: str, model: str, conversation: str | None) -> None:
        self.id = gen_id
        self.model = model
        self.conversation = conversation
        self.started: m.Started | None = None
        # While it waits for room on the model: its place (None once started).
        self.queued: m.Queued | None = None
        self.done: m.Done | None = None
        self.error: FerrousClientError | None = None
        # The calls the model made (tools), each once complete, in order.
        self.tool_calls: list[m.ToolCallEvent] = []
        self._ended = False  # nothing more will come from the server
        self._exhausted = False  # the application has read the end
        self._abandoned = False  # the application left early: drop what still comes
        self._iterating = False

    def __repr__(self) -> str:
        state = "ended" if self._ended else "running"
        return f"<{type(self).__name__} {self.id} {self.model} {state}>"

    @property
    def finished(self) -> bool:
        """True once the server has sent the end (done or error), or the connection is gone."""
        return self._ended

    @property
    def finish_reason(self) -> str | None:
        return self.done.finish_reason if self.done else None

    @property
    def usage(self) -> m.Usage | None:
        return self.done.usage if self.done else None

    @property
    def timings(self) -> m.Timings | None:
        return self.done.timings if self.done else None

    def _note(self, msg: m.Queued | m.Started | m.ToolCallEvent) -> None:
        """Record an event of this generation that carries no text."""
        match msg:
            case m.Queued():
                self.queued = msg
            case m.Started():
                self.queued = None
                self.started = msg
                self.conversation = msg.conversation or self.conversation
            case m.ToolCallEvent():
                self.tool_calls.append(msg)

    def _read_end(self, item: m.Done | FerrousClientError) -> None:
        """The application has reached the end: raise what it means (nothing for a normal end)."""
        self._exhausted = True
        if isinstance(item, FerrousClientError):
            raise item
        error = finish_error(self.id, item)
        if error is not None:
            self.error = error
            raise error


class Generation(GenerationState):
    """One generation: an async iterable of :class:`Delta` messages.

    After the iteration ends, ``done`` holds the :class:`Done` message (finish
    reason, usage, timings) and ``conversation`` the conversation id to pass to
    the next ``chat()``. Errors for this generation are raised from the
    iteration, after the text that came before them. A ``done`` with finish
    reason ``error`` raises :class:`EngineError`, ``stalled`` :class:`Stalled`;
    ``cancelled`` ends the iteration normally.
    """

    def __init__(
        self, client: FerrousClient, gen_id: str, model: str, conversation: str | None
    ) -> None:
        super().__init__(gen_id, model, conversation)
        # Set when another node runs the generation again (the node running it
        # stopped): the text before it is void, and deltas count from seq 0 again.
        self.restarted: m.Restarted | None = None
        self._client = client
        self._queue: asyncio.Queue[GenerationItem] = asyncio.Queue()
        self._anext_iter: AsyncGenerator[m.Delta, None] | None = None

    def __aiter__(self) -> AsyncIterator[m.Delta]:
        # A fresh async generator per loop: when a loop is left early, Python
        # finalizes it (asyncio runs its aclose()), which cancels the generation.
        return self._iterate()

    async def __anext__(self) -> m.Delta:
        """``await anext(gen)`` outside ``async for``; call ``aclose()`` to stop early."""
        if self._anext_iter is None:
            self._anext_iter = self._iterate()
        return await anext(self._anext_iter)

    async def _iterate(self) -> AsyncGenerator[m.Delta, None]:
        if self._iterating:
            raise RuntimeError(f"generation {self.id} is already being iterated")
        self._iterating = True
        try:
            while (delta := await self._next()) is not None:
                yield delta
        finally:
            self._iterating = False
            if not self._exhausted:
                self._abandon()

    async def _next(self) -> m.Delta | None:
        if self._exhausted or self._abandoned:
            return None
        if self._queue.empty():
            item = await self._client._wait_for(self)
        else:
            item = self._queue.get_nowait()
        if isinstance(item, m.Delta):
            self._client._consumed(utf8_len(item.text))
            return item
        self._read_end(item)
        return None

    async def collect(self) -> str:
        """Read the generation to its end and return its whole text (after a restart,
        that of the run that finished: deltas count from seq 0 again)."""
        parts: list[str] = []
        async for delta in self:
            if delta.seq == 0:
                parts.clear()
            parts.append(delta.text)
        return "".join(parts)

    async def cancel(self) -> None:
        """Ask the server to stop; the iteration then ends with finish reason ``cancelled``.

        Text already on its way is still yielded. Does nothing once the generation ended.
        """
        if not self._ended:
            await self._client._send_cancel(self.id, wait=True)

    async def aclose(self) -> None:
        """Stop reading: cancel the generation if it is running and drop what still comes."""
        if self._anext_iter is not None:
            await self._anext_iter.aclose()
        if not self._exhausted:
            self._abandon()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- called by the client -------------------------------------------------------------

    def _abandon(self) -> None:
        if self._abandoned:
            return
        self._abandoned = True
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, m.Delta):
                self._client._consumed(utf8_len(item.text))
        if not self._ended:
            with contextlib.suppress(ConnectionLost):
                self._client._send_cancel_nowait(self.id)

    def _deliver(self, item: GenerationItem) -> None:
        if isinstance(item, m.Done):
            self.done = item
            self.conversation = item.conversation or self.conversation
        elif isinstance(item, FerrousClientError):
            self.error = item
        if not isinstance(item, m.Delta):
            self._ended = True
        if not self._abandoned:
            self._queue.put_nowait(item)
