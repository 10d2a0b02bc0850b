"""Workers on other machines: where they are started, and how they reach the gateway.

A local worker is a child process with a socket pair and shared-memory rings.
A remote one is started by a :class:`WorkerHost` (the Ray placement,
:mod:`engine.rayhost`, is the one the project ships) on a machine that has
what it needs; it connects back over TCP to the pool's :class:`WorkerListener`
and says, in its first frame, which start it answers (a one-time nonce: a
connection that cannot name one is closed). From there it speaks the same
control frames, and its generations' text comes over the same connection
(:mod:`engine.netring`), with the same bound on what is in flight.

The model files must be at the same paths on the worker's machine (a shared
volume): a load names a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Protocol

import msgspec

from engine import ipc

__all__ = ["RemoteProcess", "WorkerHost", "WorkerListener"]

log = logging.getLogger("ferrous.engine")


class RemoteProcess(Protocol):
    """What the pool needs of a worker's process (an asyncio subprocess has it too)."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


class WorkerHost(Protocol):
    """Starts workers elsewhere."""

    #: The address the workers connect back to (``host:port`` of the listener).
    advertise: str

    async def launch(self, index: int, address: str, nonce: str) -> RemoteProcess:
        """Start worker ``index`` so that it connects to ``address`` with ``nonce``."""

    def describe(self, proc: RemoteProcess) -> str:
        """Where ``proc`` runs, for logs and health (a node id)."""

    async def close(self) -> None:
        """The pool is done with the host (its workers are stopped)."""


HANDSHAKE_TIMEOUT = 10.0  # seconds a new connection has to name its start


class _Handshake(asyncio.Protocol):
    """A new connection until its Hello names a start; then the worker's protocol."""

    def __init__(self, listener: WorkerListener) -> None:
        self._listener = listener
        self._frames = ipc.FrameBuffer()
        self._buffered = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport
        # A connection that says nothing does not hold a descriptor for long.
        self._timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT, self._drop, "no first frame in time"
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffered += data
        if len(self._buffered) > 1 << 16:
            self._drop("a first frame larger than 64 KiB")
            return
        try:
            bodies = self._frames.feed(data)
        except ValueError:
            self._drop("a malformed frame")
            return
        if not bodies:
            return
        try:
            hello = ipc.decode_from_worker(bodies[0])
        except (ValueError, msgspec.DecodeError):
            self._drop("a malformed first frame")
            return
        worker = (
            self._listener.claim(hello.nonce)
            if isinstance(hello, ipc.Hello) and hello.nonce
            else None
        )
        if worker is None or self._transport is None:
            self._drop("a first frame that names no start of this pool")
            return
        transport, rest = self._transport, self._buffered
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
        transport.set_protocol(worker)
        worker.connection_made(transport)
        worker.data_received(rest)

    def _drop(self, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            log.warning("closing a worker connection: %s", why)
            self._transport.abort()
            self._transport = None


class WorkerListener:
    """The TCP port remote workers connect back to (see the module)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._expected: dict[str, asyncio.Protocol] = {}  # a worker's, by nonce

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: _Handshake(self), self._host, self._port
            )

    def expect(self, worker: asyncio.Protocol) -> str:
        """A nonce for ``worker``'s start: its connection is handed to it."""
        nonce = secrets.token_urlsafe(24)
        self._expected[nonce] = worker
        return nonce

    def forget(self, nonce: str) -> None:
        self._expected.pop(nonce, None)

    def claim(self, nonce: str) -> asyncio.Protocol | None:
        return self._expected.pop(nonce, None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
