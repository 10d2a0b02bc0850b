"""The resume half of a WebSocket session: a new connection carries on a dropped one.

:class:`ResumableSession` is mixed into :class:`gateway.sessions.Session`. A
``hello`` with a resume token either *adopts* the session this process holds
(the new connection gets ``ready``, the messages it missed from the replay
log, then the live stream) or, in a deployment that shares state, *takes
over* a session another node ran (:mod:`gateway.takeover`). What it needs of
the session is declared below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from gateway.auth import Principal
from gateway.replay import ReplayLog
from gateway.takeover import RESTART_REASON, interrupted_error, take_over
from protocol import messages as m
from protocol.codec import Codec
from protocol.errors import Conflict, FerrousError, ResumeExpired

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = ["CLOSE_TAKEN_OVER", "CONNECTION_EXTENSION", "ResumableSession"]

log = logging.getLogger("ferrous.session")

# The ASGI scope extension through which the server hands a session its connection's
# reset (gateway.server): a connection stuck writing cannot take a close frame.
CONNECTION_EXTENSION = "ferrous.connection"

CLOSE_TAKEN_OVER = 4000  # private range: another connection resumed this session


class ResumableSession:
    """Adopting and taking over sessions; mixed into :class:`gateway.sessions.Session`."""

    # What the session provides.
    gateway: Gateway
    id: str
    ws: Any
    conn: int
    principal: Principal
    owner: tuple[str | None, str]
    codec: Codec
    helloed: bool
    closed: bool
    resume_token: str | None
    gens: dict[str, asyncio.Task[None]]
    taken_over_by: Any
    _credits: int | None
    _credit_event: asyncio.Event | None
    _send_lock: asyncio.Lock
    _log: ReplayLog[m.ServerMessage] | None

    async def _ready(self, *, resumed: bool, principal: Principal | None = None) -> m.Ready:
        raise NotImplementedError

    async def send(self, msg: m.ServerMessage, *, apart: bool = False) -> None:
        raise NotImplementedError

    async def send_error(
        self, exc: FerrousError, gen_id: str | None = None, *, apart: bool = False
    ) -> None:
        raise NotImplementedError

    async def _write(self, data: str | bytes) -> None:
        raise NotImplementedError

    def _start(self, msg: Any, listen: Any = None) -> None:
        raise NotImplementedError

    async def end(self) -> None:
        raise NotImplementedError

    def _wake_room(self) -> None:
        raise NotImplementedError

    async def _resume(self, msg: m.Hello) -> None:
        """This connection's hello resumes another session: hand the connection over."""
        assert msg.resume is not None
        g = self.gateway
        try:
            target = g.resumable.claim(msg.resume, self.owner)
        except ResumeExpired:
            if not g.mirror.shared:
                raise
            # Not in this process: the node that ran it may have stopped.
            await self._take_over(msg)
            g.metrics.resumes.labels("taken_over").inc()
            return
        assert isinstance(target, ResumableSession)
        try:
            await target.adopt(self.ws, self.principal, self.codec, msg)
        except ResumeExpired:
            await target.end()
            raise
        except Conflict:
            raise  # a newer connection took the session: it is that one's now
        except BaseException:
            g.resumable.detach(target)  # claimed but not attached: it may still be resumed
            raise
        g.metrics.resumes.labels("resumed").inc()
        self.helloed = True
        self.closed = True  # this object's part is over; the connection is the target's now
        self.taken_over_by = target

    async def _take_over(self, hello: m.Hello) -> None:
        """This connection continues a session another node ran (:mod:`gateway.takeover`):
        ``ready``, the kept messages after ``last``, then each interrupted generation
        again after ``restarted``."""
        assert hello.resume is not None
        g = self.gateway
        token = hello.resume
        adopted = await take_over(g, self.owner, hello, self.codec)
        self.helloed = True
        self._credits = hello.credits
        self.resume_token = token
        self._log = adopted.log
        g.resumable.register(self)
        ready = await self._ready(resumed=True)
        ready.generations = adopted.generations
        async with self._send_lock:
            for frame in (self.codec.encode(ready), *adopted.frames):
                await self._write(frame)
        for gen_id in adopted.plan.failed:
            g.mirror.finished(token, gen_id)
            await self.send_error(interrupted_error(), gen_id)
        for request in adopted.plan.restart:
            await self.send(m.Restarted(request.id, RESTART_REASON))
            try:
                self._start(request)
            except FerrousError as exc:
                g.mirror.finished(token, request.id)
                await self.send_error(exc, request.id)

    async def adopt(self, ws: Any, principal: Principal, codec: Codec, hello: m.Hello) -> None:
        """Carry on over ``ws``: ``ready``, what the client missed after ``hello.last``, then live.

        Raises :class:`ResumeExpired` when the messages after ``last`` are no
        longer all kept (the caller ends the session then), :class:`Conflict`
        when a newer connection resumed the session meanwhile.
        """
        assert self._log is not None
        self.conn += 1  # from here the old connection's reader says "superseded"
        conn = self.conn
        if not self.closed:
            # The old connection still looked alive (a half-open socket, or a client
            # that reconnected early): it carries nothing of this session any more.
            self.closed = True
            await _close_or_abort(self.ws, self._send_lock)
        ready = await self._ready(resumed=True, principal=principal)
        async with self._send_lock:
            if self.conn != conn:
                raise Conflict("a newer connection resumed this session meanwhile")
            missed = self._log.since(hello.last)
            if missed is None:
                raise ResumeExpired(
                    f"the messages after n={hello.last} are no longer kept "
                    f"(kept from n={self._log.lost + 1})"
                )
            # Log keys are "<id>#<run>" (a generation's stream) or "<id>!" (a refusal).
            kept = {k.rsplit("#", 1)[0].removesuffix("!") for k in self._log.generations()}
            ready.generations = sorted(kept | set(self.gens))
            frames = [codec.encode(ready), *(codec.encode(item) for item in missed)]
            self.ws, self.codec, self.principal = ws, codec, principal
            self.closed = False
            self._credits = hello.credits
            if self._credit_event is not None:
                self._credit_event.set()
            for frame in frames:
                await self._write(frame)
            self._wake_room()
        log.info("session resumed: %d messages after n=%d sent again", len(missed), hello.last)

    def detach(self) -> None:
        """The connection dropped: keep the session for the resume window."""
        self.closed = True
        self.gateway.resumable.detach(self)


async def _close_or_abort(ws: Any, send_lock: asyncio.Lock) -> None:
    """End a connection another one replaces: a close frame (4000) once the write in
    progress is done, else (a write stuck on its full buffer, or no answer within a
    second) a reset.

    The session is marked closed first, so no new write starts on it; waiting for
    the one under way (a delta being sent, the usual case while a generation
    streams) lets the client see 4000 and not resume, where a reset would make it
    try to resume and race the connection that took the session.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            async with send_lock:
                await ws.close(code=CLOSE_TAKEN_OVER, reason="session resumed elsewhere")
                return
    abort = ws.scope.get("extensions", {}).get(CONNECTION_EXTENSION, {}).get("abort")
    if abort is not None:
        abort()
