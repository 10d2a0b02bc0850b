"""WebSocket sessions: one per connection, speaking protocol v1 over the engine.

A session reads client messages in one loop and runs each generation as its
own task, so several generations stream at once and a cancel is handled while
tokens flow. Each generation task pulls the next event from the engine only
after the previous delta went out (and, with flow control on, only while the
client has credit), so a slow client pauses its generations in the worker
rather than piling text up in memory here.

Conversations live in a :class:`gateway.conversations.ConversationStore`
keyed by (tenant, user, conversation id): a user who reconnects continues a
conversation, and another user naming the same id gets their own, empty one.

Resume: with ``limits.resume_window`` above 0, every message about a
generation is numbered and kept in a :class:`gateway.replay.ReplayLog` after
it is written, and a connection that drops without the client closing it
*detaches* the session instead of ending it (:mod:`gateway.resume`). Its
generations run on into the log (one whose budget is full waits, which
pauses it in the worker) until a new connection of the same user presents
the token: :meth:`Session.adopt` then writes what the client missed and the
live stream goes on, in one order, under the send lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from gateway.auth import Principal
from gateway.drawing import draw
from gateway.generation import fair_share_key
from gateway.listening import ListenStream
from gateway.replay import ReplayLog
from gateway.sessionresume import CLOSE_TAKEN_OVER, CONNECTION_EXTENSION, ResumableSession
from gateway.streams import GenerationStreams
from gateway.videojobs import watch
from gateway.voiceturn import speak
from protocol import messages as m
from protocol.codec import Codec
from protocol.errors import (
    BadRequest,
    Conflict,
    FerrousError,
    NotFound,
    Overloaded,
    RateLimited,
    ResumeExpired,
    TooLarge,
)

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_TAKEN_OVER",
    "CONNECTION_EXTENSION",
    "Session",
]

log = logging.getLogger("ferrous.session")

_MSGPACK = msgspec.msgpack.Encoder()  # messages and requests as the session mirror keeps them

# Close codes (RFC 6455 section 7.4.1); CLOSE_TAKEN_OVER (private range) is for a
# connection whose session another connection resumed.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008

CLOSE_ABNORMAL = 1006  # no close frame: the connection was lost
# Disconnects that leave a session for a resume: going away, and a connection that
# ended without a close frame (the server reports 1005 or 1006 for that).
_DROPPED = frozenset({CLOSE_GOING_AWAY, 1005, CLOSE_ABNORMAL})

# Messages numbered for resume: those about one generation.
_NUMBERED = (
    m.Queued,
    m.Started,
    m.Delta,
    m.ToolCallEvent,
    m.Done,
    m.Error,
    m.Restarted,
    m.Progress,
    m.SpeechEdge,
    m.TranscriptEvent,
    m.AudioOut,
)


def _ends_generation(msg: m.ServerMessage) -> bool:
    return isinstance(msg, m.Done | m.Error) or (
        isinstance(msg, m.Progress) and msg.status == "success"
    )


class Session(GenerationStreams, ResumableSession):
    """One WebSocket connection after a successful handshake (its generations run in
    :class:`gateway.streams.GenerationStreams`)."""

    def __init__(self, gateway: Gateway, ws: Any, principal: Principal, codec: Codec) -> None:
        self.gateway = gateway
        self.ws = ws
        self.conn = 0  # which connection carries the session (one more per resume)
        self.principal = principal
        self.codec = codec
        self.id = "s-" + secrets.token_hex(6)
        self.owner = (principal.tenant, principal.user)
        self.helloed = False
        self.gens: dict[str, asyncio.Task[None]] = {}
        self.listens: dict[str, ListenStream] = {}  # open audio streams, by generation id
        self._user_cancelled: set[str] = set()
        # queued (task not started) -> prep (model, conversation) -> engine -> ending (done received)
        self._phase: dict[str, str] = {}
        self._calls_sent: dict[str, int] = {}  # tool_call events sent, per generation
        self._send_lock = asyncio.Lock()
        self._credits: int | None = None  # None: flow control off
        # Created when a generation first waits for credit: idle sessions (thousands of
        # them) do not pay for an Event, nor for a task per session timing the token.
        self._credit_event: asyncio.Event | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.closed = False  # the current connection is closed (the session may live on)
        self.ended = False  # the session is over: generations cancelled, token forgotten
        # Resume (set at hello when the server keeps dropped sessions).
        self.resume_token: str | None = None
        self._log: ReplayLog[m.ServerMessage] | None = None
        self._log_keys: dict[str, str] = {}  # generation id -> its key in the log
        self._runs = 0
        # Set when a generation waiting for replay room may go on (an ack, a resume, the end).
        self._room_event: asyncio.Event | None = None
        self._acking = False  # the client sends acks: unacked text holds generations back
        self.taken_over_by: Session | None = None  # a hello that resumed another session
        self.on_end: Any = None  # called once the session has ended (the gateway's books)

    # -- sending ----------------------------------------------------------------------

    async def send(self, msg: m.ServerMessage, *, apart: bool = False) -> None:
        """Write ``msg``; numbered and kept for a resume when it is about a generation.

        ``apart``: an answer to a client message that names a generation but is
        not part of its stream (a refused start, a cancel of nothing): kept on
        its own rather than with a running generation of the same id.
        """
        log_ = self._log
        key = None
        final = False
        if log_ is not None and isinstance(msg, _NUMBERED) and msg.id is not None:
            key = f"{msg.id}!" if apart else self._log_keys.get(msg.id, msg.id)
            final = _ends_generation(msg)
            if not final:
                await self._room(log_, key)
        async with self._send_lock:
            if log_ is not None and key is not None:
                assert isinstance(msg, _NUMBERED)
                msg.n = log_.next_number()
                data = self.codec.encode(msg)
                # Nothing is dropped while nobody reads, nor for a client that acks
                # (its generations wait for acks instead, in _room).
                trim = not self.closed and not self._acking
                log_.add(msg.n, key, msg, len(data), final=final, trim=trim)
                mirror = self.gateway.mirror
                if mirror.shared and self.resume_token is not None:
                    payload = data if isinstance(data, bytes) else _MSGPACK.encode(msg)
                    mirror.sent(self.resume_token, msg.n, payload)
                    if final:
                        # Written before the client sees it: a node that takes the
                        # session over never runs again a generation the client saw end.
                        await mirror.sync()
            else:
                data = self.codec.encode(msg)
            await self._write(data)

    async def _write(self, data: str | bytes) -> None:
        """One frame to the current connection (under the send lock)."""
        if self.closed:
            return
        try:
            if isinstance(data, str):
                await self.ws.send_text(data)
            else:
                await self.ws.send_bytes(data)
        except (WebSocketDisconnect, WebSocketDisconnected, RuntimeError):
            # The peer left (or broke the framing and was closed: sending after the
            # close is a RuntimeError) while we answered: nothing can reach it on this
            # connection. Not a session failure: the receive loop sees the disconnect
            # next and ends or detaches the session.
            self.closed = True

    async def _room(self, log_: ReplayLog[m.ServerMessage], key: str) -> None:
        """Wait while this generation's replay budget is full and nobody reads it (or the
        client, which acks, has not confirmed what it got).

        The generation stops pulling from the engine meanwhile, so its worker
        pauses it, as it pauses one whose reader is slow.
        """
        while not log_.has_room(key) and (self.closed or self._acking) and not self.ended:
            if self._room_event is None:
                self._room_event = asyncio.Event()
            self._room_event.clear()
            await self._room_event.wait()

    def _wake_room(self) -> None:
        if self._room_event is not None:
            self._room_event.set()

    async def send_error(
        self, exc: FerrousError, gen_id: str | None = None, *, apart: bool = False
    ) -> None:
        self.gateway.metrics.errors.labels(exc.code.value).inc()
        with contextlib.suppress(Exception):
            await self.send(
                m.Error(exc.code, exc.message, gen_id, exc.retryable, exc.retry_after),
                apart=apart,
            )

    async def close(self, code: int, reason: str = "") -> None:
        async with self._send_lock:
            if self.closed:
                return
            self.closed = True
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=reason)

    async def end(self) -> None:
        """The session is over: cancel its generations, forget its token (idempotent)."""
        if self.ended:
            return
        self.ended = True
        self.gateway.resumable.unregister(self)
        if self.resume_token is not None:
            self.gateway.mirror.ended(self.resume_token)
        self._wake_room()  # generations waiting for room see the cancel next
        try:
            await self.cancel_all()
        finally:
            if self.on_end is not None:
                self.on_end(self)

    # -- the receive loop ---------------------------------------------------------------

    async def run(self) -> str:
        """Read the current connection until it ends; say how.

        ``"closed"``: the client closed it (or the server ended the session);
        ``"dropped"``: it went away without a close the client asked for (the
        session may be detached); ``"superseded"``: another connection resumed
        the session; ``"resumed"``: this connection's hello resumed another
        session (in ``taken_over_by``), which the caller continues with.
        """
        limits = self.gateway.config.limits
        ws, conn = self.ws, self.conn
        timer = None
        if self.principal.expires_at is not None:
            # The same leeway the handshake allowed applies for the rest of the session.
            expires = self.principal.expires_at + self.gateway.config.auth.leeway
            timer = asyncio.get_running_loop().call_later(
                max(0.0, expires - time.time()), self._expired
            )
        how = "dropped"
        try:
            while True:
                frame = await ws.receive()
                if frame["type"] == "websocket.disconnect":
                    # A close the client asked for, or one for a protocol breach, ends
                    # the session; a lost connection (or a page going away) keeps it.
                    if frame.get("code", CLOSE_ABNORMAL) not in _DROPPED:
                        how = "closed"
                    break
                data: str | bytes | None = frame.get("text")
                if data is None:
                    data = frame.get("bytes") or b""
                    if not self.codec.binary:
                        # Binary frames on the JSON subprotocol are raw audio samples.
                        try:
                            await self._raw_audio(data)
                        except FerrousError as exc:
                            await self.send_error(exc, getattr(exc, "gen_id", None), apart=True)
                        continue
                size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8"))
                if size > limits.max_frame_bytes:
                    await self.send_error(
                        TooLarge(
                            f"a frame of {size} bytes exceeds the limit of {limits.max_frame_bytes}"
                        )
                    )
                    continue
                try:
                    msg = self.codec.decode_client(data)
                    await self._handle(msg)
                except FerrousError as exc:
                    await self.send_error(exc, getattr(exc, "gen_id", None), apart=True)
                if self.taken_over_by is not None:
                    return "resumed"
        finally:
            if timer is not None:
                timer.cancel()
            if self._expiry is not None and self.conn == conn:
                self._expiry.cancel()
        if self.conn != conn:
            return "superseded"
        if self.ended or self._log is None:
            return "closed"
        return how

    async def cancel_all(self) -> None:
        tasks = list(self.gens.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop_generations(self, timeout: float = 2.0) -> None:
        """Cancel every generation so that each still ends with a ``done`` (server shutdown)."""
        for gen_id in list(self.gens):
            await self._cancel(gen_id)
        tasks = list(self.gens.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self.cancel_all()

    async def taken_elsewhere(self) -> None:
        """Another node took this session over (this one was taken for dead): end this
        copy without a word to the client, whose session continues there."""
        await self.end()
        await self.close(CLOSE_TAKEN_OVER, "session resumed elsewhere")

    def _expired(self) -> None:
        self._expiry = asyncio.create_task(self._expire("token expired"))

    def revoked(self) -> None:
        """The credential behind this session was revoked: end it as an expired token ends it."""
        if self.ended or (self._expiry is not None and not self._expiry.done()):
            return
        kind = "API key" if self.principal.key_id is not None else "token"
        self._expiry = asyncio.create_task(self._expire(f"{kind} revoked"))

    async def _expire(self, reason: str) -> None:
        """The credential is no longer valid: say so, end the session, close (policy violation)."""
        from gateway.auth import Unauthorized

        await self.send_error(Unauthorized(reason))
        await self.end()
        await self.close(CLOSE_POLICY, reason)

    async def _handle(self, msg: m.ClientMessage) -> None:
        match msg:
            case m.Hello():
                await self._hello(msg)
            case m.Heartbeat():
                await self.send(m.ServerHeartbeat(time.time()))
            case _ if not self.helloed:
                raise BadRequest("send hello first")
            case m.Generate() | m.Chat() | m.Pull() | m.Speak() | m.Draw() | m.Watch():
                self._start(msg)
            case m.Listen():
                vad = await self.gateway.voice_activity()
                self._start(msg, ListenStream(self, msg, vad))
            case m.Audio():
                stream = self.listens.get(msg.id)
                if stream is None:
                    raise _with_id(NotFound(f"no open listen stream {msg.id!r}"), msg.id)
                await stream.feed(msg.data, end=msg.end)
            case m.Cancel():
                await self._cancel(msg.id)
            case m.Ack():
                if self._log is not None:
                    self._log.ack(msg.n)
                    self._acking = True
                    self._wake_room()
                    if self.resume_token is not None:
                        self.gateway.mirror.acked(self.resume_token, msg.n)
            case m.Credit():
                if self._credits is None:
                    raise BadRequest("flow control is off: set credits in hello to use it")
                self._credits += msg.bytes
                if self._credit_event is not None:
                    self._credit_event.set()
            case m.Forget():
                if not await self.gateway.conversations.forget(self.owner, msg.conversation):
                    raise NotFound(f"no conversation {msg.conversation!r}")

    async def _hello(self, msg: m.Hello) -> None:
        if self.helloed:
            raise BadRequest("hello was already sent")
        if msg.protocol != 1:
            raise BadRequest(
                f"protocol version {msg.protocol} is not supported; this server speaks 1"
            )
        g = self.gateway
        if msg.resume is not None:
            try:
                await self._resume(msg)
                return
            except FerrousError as exc:
                # Refused: say why, then open a new session on this connection
                # (``ready.resumed`` false tells the client its generations are lost).
                outcome = "refused" if exc.code.value == "forbidden" else "expired"
                g.metrics.resumes.labels(outcome).inc()
                log.info("resume refused: %s", exc.message)
                await self.send_error(exc)
        self.helloed = True
        self._credits = msg.credits
        if g.resumable.enabled:
            self.resume_token = secrets.token_urlsafe(24)
            self._log = ReplayLog(g.config.limits.resume_buffer_bytes)
            g.resumable.register(self)
            g.mirror.opened(self.resume_token, self.id, self.owner)
            await g.mirror.sync()  # written before the client holds the token
        await self.send(await self._ready(resumed=False))

    async def _ready(self, *, resumed: bool, principal: Principal | None = None) -> m.Ready:
        g = self.gateway
        principal = principal or self.principal
        lim = g.config.limits
        return m.Ready(
            protocol=1,
            server="ferrousforge",
            version=g.version,
            session=self.id,
            user=principal.user,
            models=await g.model_names(principal),
            limits=m.Limits(
                lim.max_frame_bytes,
                lim.max_concurrent_generations,
                lim.max_prompt_tokens,
                lim.heartbeat_interval,
            ),
            flow_control=self._credits is not None,
            resume_token=self.resume_token,
            resume_window=g.resumable.window if self.resume_token else 0.0,
            resumed=resumed,
        )

    # -- generations --------------------------------------------------------------------

    async def _raw_audio(self, data: bytes) -> None:
        """A binary frame on ``ferrous.v1.json``: samples for the one open listen stream."""
        limit = self.gateway.config.limits.max_frame_bytes
        if len(data) > limit:
            raise TooLarge(f"a frame of {len(data)} bytes exceeds the limit of {limit}")
        if not self.helloed:
            raise BadRequest("send hello first")
        if len(self.listens) != 1:
            raise BadRequest(
                "binary frames carry audio for the one open listen stream; "
                f"{len(self.listens)} are open (send audio messages with an id instead)"
            )
        [stream] = self.listens.values()
        await stream.feed(data)

    def _start(
        self,
        msg: m.Generate | m.Chat | m.Pull | m.Speak | m.Draw | m.Watch | m.Listen,
        listen: Any = None,
    ) -> None:
        if self.ended:
            raise _with_id(ResumeExpired("this session has ended"), msg.id)
        limit = self.gateway.config.limits.max_concurrent_generations
        if msg.id in self.gens:
            raise _with_id(Conflict(f"generation {msg.id!r} is still running"), msg.id)
        if len(self.gens) >= limit:
            if isinstance(msg, m.Generate | m.Chat):
                metrics = self.gateway.metrics
                tenant = metrics.tenant_label(fair_share_key(self.principal))
                # No model label: the name is the client's, not yet resolved (any
                # string would make a series of its own).
                metrics.refusals.labels("rate_limited", tenant, "").inc()
            raise _with_id(
                RateLimited(
                    f"at most {limit} generations may run at once in a session; "
                    "retry when one ends",
                    retry_after=1.0,
                ),
                msg.id,
            )
        if self.gateway.draining:
            raise _with_id(Overloaded("the server is shutting down"), msg.id)
        if isinstance(msg, m.Chat) and msg.conversation is None:
            # Named here, not when it runs: a node that runs it again continues the same one.
            msg.conversation = "c-" + secrets.token_hex(8)
        work: Coroutine[Any, Any, None]
        if isinstance(msg, m.Pull):
            work = self._pull(msg)
        elif isinstance(msg, m.Speak):
            work = speak(self, msg)
        elif isinstance(msg, m.Draw):
            work = draw(self, msg)
        elif isinstance(msg, m.Watch):
            work = watch(self, msg)
        elif isinstance(listen, ListenStream):
            work = listen.run()
            self.listens[msg.id] = listen
        else:
            assert isinstance(msg, m.Generate | m.Chat)
            work = self._generate(msg)
        task = asyncio.create_task(work, name=f"gen-{self.id}-{msg.id}")
        self.gens[msg.id] = task
        gen_id = msg.id
        mirror = self.gateway.mirror
        token = self.resume_token
        if mirror.shared and token is not None:
            # What another node runs again if this one stops (b"": it cannot).
            request = _MSGPACK.encode(msg) if isinstance(msg, m.Generate | m.Chat) else b""
            mirror.started(token, gen_id, request)
        # Ids are unique among running generations only: the log keys each run apart.
        self._runs += 1
        self._log_keys[gen_id] = f"{gen_id}#{self._runs}"

        def forget(_t: asyncio.Task[None]) -> None:
            if mirror.shared and token is not None:
                mirror.finished(token, gen_id)
            self.gens.pop(gen_id, None)
            self._phase.pop(gen_id, None)
            self._calls_sent.pop(gen_id, None)
            self._log_keys.pop(gen_id, None)
            self.listens.pop(gen_id, None)
            self._user_cancelled.discard(gen_id)

        # Voice streams have no engine request of their own: a cancel stops their task.
        self._phase[gen_id] = "queued" if isinstance(msg, m.Generate | m.Chat | m.Pull) else "prep"
        task.add_done_callback(forget)

    async def _cancel(self, gen_id: str) -> None:
        task = self.gens.get(gen_id)
        if task is None:
            if any(stream.interrupt_turn(gen_id) for stream in self.listens.values()):
                return
            raise _with_id(NotFound(f"no running generation {gen_id!r}"), gen_id)
        self._user_cancelled.add(gen_id)
        phase = self._phase.get(gen_id)
        if phase == "prep":
            task.cancel()
        elif phase == "engine" and not await self.gateway.engine.cancel(self._request_id(gen_id)):
            task.cancel()  # still waiting for a worker: nothing runs in the engine yet
        # "queued": the task sees the request when it starts; "ending": its done is on the way.

    def _request_id(self, gen_id: str) -> str:
        return f"{self.id}:{gen_id}"


def _with_id(exc: FerrousError, gen_id: str) -> FerrousError:
    exc.gen_id = gen_id  # type: ignore[attr-defined]
    return exc
