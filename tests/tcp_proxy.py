"""A loopback TCP relay for tests that can cut its connections at chosen byte counts.

Tests put it between a real client and a real server to break the link the
way networks do: both sockets are aborted (no close frame, no FIN
handshake), mid-frame if the count lands there. It relays bytes and nothing
else: it does not parse or alter what flows through.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

__all__ = ["Relay"]


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    # Bytes each direction may still carry before the link is cut (None: no limit).
    budget: dict[str, int | None] = field(default_factory=lambda: {"down": None, "up": None})
    cut: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        for w in (self.client, self.server):
            w.transport.abort()
        self.cut.set()


class Relay:
    """``async with Relay(port) as relay``: connect to ``relay.port`` instead of ``port``."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.host = host
        self.port = 0
        self.links: list[_Link] = []
        self.accepting = True
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for link in self.links:
            link.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def current(self) -> _Link:
        """The newest link."""
        return self.links[-1]

    def cut_after(self, nbytes: int, direction: str = "down") -> _Link:
        """Cut the newest link once ``direction`` ("down": to the client, "up": to the
        server) has carried ``nbytes`` more bytes."""
        link = self.current
        link.budget[direction] = nbytes
        if nbytes <= 0:
            link.abort()
        return link

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self.links.append(link)
        for src, dst, direction in ((reader, up_writer, "up"), (up_reader, writer, "down")):
            task = asyncio.create_task(self._pump(link, src, dst, direction))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        link: _Link,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                left = link.budget[direction]
                if left is not None and len(data) >= left:
                    dst.write(data[:left])
                    link.abort()
                    return
                if left is not None:
                    link.budget[direction] = left - len(data)
                dst.write(data)
                await dst.drain()
            # One side closed its end: pass the close on, as a router would.
            if dst.can_write_eof():
                dst.write_eof()
