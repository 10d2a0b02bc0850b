"""The resume half of :class:`ferrous_client.FerrousClient`: after a dropped connection,
reconnect within the server's window, offer the last message seen, and send
again exactly what the server never got.

Kept apart from the client because it is one job with its own rules (see
:mod:`ferrous_client.resume` for the state it keeps): which frames the dead
link did not take, which starts the server lists as received, which cancels
may have been lost, and how everything in flight fails when the session
cannot be resumed. The client's connection, reader and writer are its own;
this mixin names the parts of it that a resume touches.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence

import msgspec
from websockets.asyncio.client import ClientConnection

from ferrous_client.backoff import Backoff, should_retry
from ferrous_client.credits import CreditWindow
from ferrous_client.errors import ConnectionLost, FerrousClientError, ResumeExpired
from ferrous_client.generation import Generation
from ferrous_client.handshake import Handshake
from ferrous_client.protocol import messages as m
from ferrous_client.protocol.codec import Codec
from ferrous_client.resume import ResumeState, may_resume

__all__ = ["Outgoing", "SessionResumer", "drain_queue"]

log = logging.getLogger("ferrous_client")

Outgoing = tuple[bytes | str, asyncio.Future[None] | None]
"""A frame waiting to be written, and the future of whoever waits for it (if anyone)."""


class SessionResumer:
    """Resuming a session after a dropped connection (see the module)."""

    # The client's state a resume reads and replaces (set by FerrousClient.__init__).
    _ws: ClientConnection | None
    _ready: m.Ready | None
    _closing: bool
    _resume: bool
    _outgoing: asyncio.Queue[Outgoing | None]
    _resuming: asyncio.Task[None] | None
    _writer: asyncio.Task[None] | None
    _unsent: list[Outgoing]
    _window: CreditWindow | None
    _handshake: Handshake
    _codec: Codec
    _state: ResumeState
    _gens: dict[str, Generation]
    _starts: dict[str, bytes | str]
    _recent: OrderedDict[str, Generation | None]
    _lost: ConnectionLost | None
    _last_error: FerrousClientError | None
    resumes: int

    def _run(self, ws: ClientConnection) -> None:
        raise NotImplementedError  # the client's: start its reader and writer on ``ws``

    async def _dial(
        self, hello: m.Hello, refusals: list[FerrousClientError] | None = None
    ) -> tuple[ClientConnection, m.Ready]:
        raise NotImplementedError  # the client's: a new connection and its ``ready``

    def _connection_lost(self, ws: ClientConnection) -> None:
        if ws is not self._ws:
            return  # a connection a resume already replaced
        ready = self._ready
        if (
            not self._closing
            and self._resume
            and ready is not None
            and ready.resume_token is not None
            and may_resume(_received_close(ws))
        ):
            # Stop the writer; what the application sends meanwhile waits for the resume.
            old, self._outgoing = self._outgoing, asyncio.Queue()
            old.put_nowait(None)
            self._resuming = asyncio.create_task(
                self._resume_session(ws, old, ready), name="ferrous-client-resume"
            )
            return
        self._give_up(ws)

    async def _resume_session(
        self, ws: ClientConnection, old: asyncio.Queue[Outgoing | None], ready: m.Ready
    ) -> None:
        """Reconnect and resume within the window; give up as a lost connection otherwise."""
        assert ready.resume_token is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready.resume_window
        delays = Backoff(attempts=1_000_000, initial=0.05, maximum=1.0).delays()
        await asyncio.gather(*(t for t in (self._writer,) if t is not None), return_exceptions=True)
        # Frames the dead link did not take, oldest first: the one in the writer's hand,
        # then the rest of its queue.
        pending = [x for x in (*self._unsent, *drain_queue(old)) if x is not None]
        self._unsent = []
        refusals: list[FerrousClientError] = []
        window = self._window
        hello = msgspec.structs.replace(
            self._handshake.hello(), resume=ready.resume_token, last=self._state.last
        )
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        new_ws, new_ready = await self._dial(hello, refusals)
                    break
                except (FerrousClientError, TimeoutError) as exc:
                    if (
                        loop.time() >= deadline
                        or (isinstance(exc, FerrousClientError) and not should_retry(exc))
                        # Nothing listens: the server is gone, and its sessions with it.
                        or isinstance(exc.__cause__, ConnectionRefusedError)
                    ):
                        raise
                    await asyncio.sleep(min(next(delays), max(0.0, deadline - loop.time())))
        except asyncio.CancelledError:
            # close() while resuming: what was in flight ends as on any close.
            self._fail_frames(pending, ConnectionLost("the client closed the connection"))
            self._resuming = None
            self._give_up(ws)
            raise
        except Exception as exc:
            log.info("the session could not be resumed: %r", exc)
            self._fail_frames(pending, ConnectionLost(f"the connection was lost: {exc}"))
            self._resuming = None
            self._give_up(ws)
            return
        self._resuming = None
        self._ready = new_ready
        if window is not None:
            # The server counts a full window again from this hello; text still
            # queued here is given back as it is read, as before.
            fresh = CreditWindow(window.window)
            fresh.buffered = window.buffered
            self._window = fresh
        # What the application sent while the link was down comes after what the
        # dead link did not take.
        pending += [x for x in drain_queue(self._outgoing) if x is not None]
        queue: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        if new_ready.resumed:
            self.resumes += 1
            self._state.resumed()
            for item in self._resend(pending, set(new_ready.generations or ())):
                queue.put_nowait(item)
            log.info("session %s resumed after n=%d", new_ready.session, hello.last)
        else:
            why = refusals[0] if refusals else None
            message = why.message if why is not None else "the server did not resume the session"
            # Nothing of the old session is sent to the new one: its generations fail
            # (the application may start them again), and so does what waited to go.
            self._fail_frames(pending, ResumeExpired(message))
            self._state = ResumeState()
            gens, self._gens = self._gens, {}
            self._starts = {}
            for gen in gens.values():
                gen._deliver(ResumeExpired(message, generation_id=gen.id))
        self._outgoing = queue
        self._run(new_ws)

    def _resend(self, pending: list[Outgoing], known: set[str]) -> list[Outgoing]:
        """After a resume: what goes on the new connection, in order.

        A start the server does not list never reached it: sent (once, wherever
        it was queued). One it lists did, even if the dead link reported its
        frame as unsent: dropped. Cancels of generations still running go again,
        since one written just before the drop may have been lost with it.
        """
        start_of = {id(data): gen_id for gen_id, data in self._starts.items()}
        out: list[Outgoing] = []
        sent: set[str] = set()
        for item in pending:
            gen_id = start_of.get(id(item[0]))
            if gen_id is None:
                out.append(item)
            elif gen_id not in known and gen_id not in sent:
                out.append(item)
                sent.add(gen_id)
        missing = [
            (data, None)
            for gen_id, data in self._starts.items()
            if gen_id not in known and gen_id not in sent
        ]
        again = [
            (self._codec.encode(m.Cancel(gen_id)), None)
            for gen_id in self._gens
            if gen_id in self._recent and gen_id in known
        ]
        return [*missing, *out, *again]

    def _fail_frames(self, items: Sequence[Outgoing | None], error: FerrousClientError) -> None:
        for item in items:
            if item is not None and item[1] is not None and not item[1].done():
                item[1].set_exception(error)

    def _give_up(self, ws: ClientConnection) -> None:
        """The connection is gone for good: fail what was in flight."""
        self._fail_frames(
            [*self._unsent, *drain_queue(self._outgoing)], ConnectionLost("the connection closed")
        )
        self._unsent = []
        if self._closing:
            lost = ConnectionLost("the client closed the connection")
        else:
            code, reason = ws.close_code, ws.close_reason or ""
            detail = " ".join(str(x) for x in (code, reason) if x)
            said = f" after {self._last_error!r}" if self._last_error is not None else ""
            lost = ConnectionLost(
                f"the connection closed ({detail or 'no close frame'}){said}",
                close_code=code,
                close_reason=reason,
            )
            lost.__cause__ = self._last_error
        self._lost = lost
        gens, self._gens = self._gens, {}
        for gen in gens.values():
            err = ConnectionLost(
                lost.message,
                generation_id=gen.id,
                close_code=lost.close_code,
                close_reason=lost.close_reason,
            )
            err.__cause__ = lost.__cause__
            gen._deliver(err)
        self._starts = {}
        # A writer blocked on a dead socket stops too.
        self._outgoing.put_nowait(None)


def _received_close(ws: ClientConnection) -> int | None:
    """The code of the close frame the server sent, None when none arrived."""
    frame = ws.protocol.close_rcvd
    return frame.code if frame is not None else None


def drain_queue(queue: asyncio.Queue[Outgoing | None]) -> list[Outgoing | None]:
    items: list[Outgoing | None] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
