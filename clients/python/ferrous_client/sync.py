"""The blocking client: one generation at a time, no asyncio (websockets' threading client).

For scripts and threads that do not run an event loop::

    with SyncFerrousClient(url, token=token) as client:
        for delta in client.chat("smollm2", "Hello"):
            print(delta.text, end="")

Frames are read while the application iterates a generation, so nothing
piles up in the client beyond what the socket buffers (with ``credits``, the
server also stops after that many unread bytes). Semantics match the async
client: errors of the generation are raised from the iteration, leaving a
``for`` early cancels the generation, server errors that belong to no
generation go to ``on_error`` (they are seen while a generation is read), and
a dropped connection is resumed within the server's window (the generation
read meanwhile goes on, each delta once; :class:`ResumeExpired` when the
session could not be resumed).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from types import TracebackType
from typing import Any, Literal, Self

import msgspec
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from ferrous_client.backoff import Backoff, should_retry
from ferrous_client.client import DEFAULT_URL, ErrorHandler
from ferrous_client.credits import CreditWindow
from ferrous_client.errors import (
    BadRequest,
    Conflict,
    ConnectionLost,
    FerrousClientError,
    ResumeExpired,
)
from ferrous_client.handshake import CLIENT_NAME, Handshake, ready_or_refusal, transport_error
from ferrous_client.protocol import messages as m
from ferrous_client.protocol.errors import ErrorCode
from ferrous_client.resume import ResumeState, may_resume
from ferrous_client.syncgeneration import SyncGeneration
from ferrous_client.wire import (
    IdSource,
    MessagesLike,
    OptionsLike,
    ToolsLike,
    checked_frame,
    decode_server,
    error_from_message,
    to_chat_messages,
    to_options,
    to_tools,
    utf8_len,
)

__all__ = ["SyncFerrousClient", "SyncGeneration"]

log = logging.getLogger("ferrous_client")

_RECENT = 256


class SyncFerrousClient:
    """A blocking session with a FerrousForge server; one generation at a time.

    Takes the same options as :class:`~ferrous_client.FerrousClient`. Starting a
    generation while another is still running raises :class:`Conflict`: read
    it to its end, cancel it, or ``close()`` it first.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        api_key: str | None = None,
        ticket: str | None = None,
        subprotocol: str = "json",
        credits: int | None = None,
        on_error: ErrorHandler | None = None,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        max_size: int | None = 2**24,
        resume: bool = True,
    ) -> None:
        self._resume = resume
        self._state = ResumeState()
        self._current_start: bytes | str | None = None
        #: How many times the session was resumed after a dropped connection.
        self.resumes = 0
        self._handshake = Handshake.build(
            url,
            token=token,
            api_key=api_key,
            ticket=ticket,
            subprotocol=subprotocol,
            credits=credits,
        )
        self._codec = self._handshake.codec
        self.on_error = on_error
        self.backoff = backoff
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._max_size = max_size
        self._ids = IdSource()
        self._ws: ClientConnection | None = None
        self._ready: m.Ready | None = None
        self._current: SyncGeneration | None = None
        # Generations left early or cancelled: their late messages are dropped.
        self._recent: OrderedDict[str, SyncGeneration] = OrderedDict()
        self._window: CreditWindow | None = None
        self._lost: ConnectionLost | None = ConnectionLost("not connected")
        self._last_error: FerrousClientError | None = None

    @property
    def ready(self) -> m.Ready:
        if self._ready is None:
            raise RuntimeError("not connected: use `with client` or `client.connect()`")
        return self._ready

    @property
    def connected(self) -> bool:
        return self._lost is None

    @classmethod
    def connect_with_retry(
        cls,
        url: str = DEFAULT_URL,
        *,
        attempts: int | None = None,
        backoff: Backoff | None = None,
        **options: Any,
    ) -> SyncFerrousClient:
        """Open a session, retrying like :meth:`FerrousClient.connect_with_retry`."""
        policy = backoff or Backoff()
        if attempts is not None:
            policy = Backoff(
                attempts=attempts,
                initial=policy.initial,
                maximum=policy.maximum,
                factor=policy.factor,
                jitter=policy.jitter,
            )
        client = cls(url, backoff=policy, **options)
        client.connect()
        return client

    def connect(self) -> Self:
        """Open the connection and the session; no-op when open. Retries with ``backoff``."""
        if self._lost is None:
            return self
        policy = self.backoff or Backoff(attempts=1)
        delays = policy.delays()
        for attempt in range(1, policy.attempts + 1):
            try:
                self._open()
                return self
            except FerrousClientError as exc:
                if attempt == policy.attempts or not should_retry(exc):
                    raise
                wait = next(delays)
                log.info(
                    "cannot open a session (%r): attempt %d of %d in %.2f s",
                    exc,
                    attempt + 1,
                    policy.attempts,
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def reconnect(self) -> Self:
        """Close (if open) and open a new session; a running generation is not sent again."""
        self.close()
        return self.connect()

    def _open(self) -> None:
        ws, ready = self._dial(self._handshake.hello())
        self._ws = ws
        self._ready = ready
        self._lost = None
        self._last_error = None
        self._current = None
        self._state = ResumeState()
        hs = self._handshake
        self._window = CreditWindow(hs.credits) if hs.credits is not None else None

    def _dial(
        self, hello: m.Hello, refusals: list[FerrousClientError] | None = None
    ) -> tuple[ClientConnection, m.Ready]:
        """A new connection and its ``ready``; errors before it go to ``refusals`` when given."""
        hs = self._handshake
        try:
            ws = connect(
                hs.url,
                subprotocols=[Subprotocol(hs.subprotocol)],
                additional_headers=hs.headers,
                user_agent_header=CLIENT_NAME,
                open_timeout=self._open_timeout,
                close_timeout=self._close_timeout,
                max_size=self._max_size,
            )
        except Exception as exc:
            raise transport_error(exc) from exc
        ws.__enter__()  # the connection is owned here and closed by close()
        try:
            if ws.subprotocol != hs.subprotocol:
                raise BadRequest(f"the server did not accept subprotocol {hs.subprotocol}")
            ws.send(self._codec.encode(hello))
            deadline = time.monotonic() + self._open_timeout
            while True:
                data = ws.recv(timeout=max(0.0, deadline - time.monotonic()))
                if (ready := ready_or_refusal(self._codec, data, refusals)) is not None:
                    break
        except BaseException as exc:
            with contextlib.suppress(Exception):
                ws.close()
            if isinstance(exc, FerrousClientError):
                raise
            if isinstance(exc, Exception):
                raise transport_error(exc) from exc
            raise
        return ws, ready

    def _try_resume(self, dead: ClientConnection) -> bool:
        """The link died: resume the session on a new one; False when that cannot be done.

        True also when the server refused the resume and opened a new session:
        the generation in flight then ends with :class:`ResumeExpired`.
        """
        ready = self._ready
        frame = dead.protocol.close_rcvd
        if (
            not self._resume
            or ready is None
            or ready.resume_token is None
            or not may_resume(frame.code if frame is not None else None)
        ):
            return False
        deadline = time.monotonic() + ready.resume_window
        delays = Backoff(attempts=1_000_000, initial=0.05, maximum=1.0).delays()
        hello = msgspec.structs.replace(
            self._handshake.hello(), resume=ready.resume_token, last=self._state.last
        )
        refusals: list[FerrousClientError] = []
        while True:
            try:
                ws, new = self._dial(hello, refusals)
                break
            except FerrousClientError as exc:
                if (
                    time.monotonic() >= deadline
                    or not should_retry(exc)
                    or isinstance(exc.__cause__, ConnectionRefusedError)
                ):
                    log.info("the session could not be resumed: %r", exc)
                    return False
                time.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))
        with contextlib.suppress(Exception):
            dead.close()
        self._ws, self._ready = ws, new
        if self._window is not None:
            fresh = CreditWindow(self._window.window)
            fresh.buffered = self._window.buffered
            self._window = fresh
        gen = self._current
        if not new.resumed:
            self._state = ResumeState()
            why = refusals[0].message if refusals else "the server did not resume the session"
            if gen is not None and not gen.finished:
                gen.error = ResumeExpired(why, generation_id=gen.id)
                gen._ended = True
            return True
        self.resumes += 1
        if gen is not None and not gen.finished:
            with contextlib.suppress(ConnectionClosed):
                if gen.id not in (new.generations or ()) and self._current_start is not None:
                    ws.send(self._current_start)  # the start never reached the server
                elif gen._abandoned:
                    ws.send(self._codec.encode(m.Cancel(gen.id)))  # the cancel may not have
        return True

    def close(self) -> None:
        """Close the connection; a running generation ends with :class:`ConnectionLost`."""
        ws, self._ws = self._ws, None
        if ws is None:
            return
        if self._lost is None:
            self._lost = ConnectionLost("the client closed the connection")
        with contextlib.suppress(Exception):
            ws.close()
        self._end_current(self._lost)

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------

    def chat(
        self,
        model: str,
        messages: MessagesLike,
        *,
        conversation: str | None = None,
        options: OptionsLike = None,
        id: str | None = None,
        token_ids: bool = False,
        priority: int = 0,
        tools: ToolsLike = None,
        tool_choice: Literal["auto", "required", "none"] = "auto",
        tool_name: str | None = None,
        parallel_tool_calls: bool = True,
    ) -> SyncGeneration:
        """Start a chat turn in ``conversation`` (a new one when None); iterate the result.

        ``tools`` as for :meth:`FerrousClient.chat`; calls land in ``tool_calls``.
        """
        msg = m.Chat(
            id=id or self._ids.next(),
            model=model,
            messages=to_chat_messages(messages),
            conversation=conversation,
            options=to_options(options),
            token_ids=token_ids,
            priority=priority,
            tools=to_tools(tools),
            tool_choice=tool_choice,
            tool_name=tool_name,
            parallel_tool_calls=parallel_tool_calls,
        )
        return self._start(msg, conversation)

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        options: OptionsLike = None,
        id: str | None = None,
        token_ids: bool = False,
        priority: int = 0,
    ) -> SyncGeneration:
        """Complete a raw prompt (no chat template); iterate the result."""
        msg = m.Generate(
            id=id or self._ids.next(),
            model=model,
            prompt=prompt,
            options=to_options(options),
            token_ids=token_ids,
            priority=priority,
        )
        return self._start(msg, None)

    def cancel(self, id: str) -> bool:
        """Cancel generation ``id``; False when it is not the one running."""
        gen = self._current
        if gen is None or gen.id != id or gen.finished:
            return False
        self._send_cancel(gen)
        return True

    def forget(self, conversation: str) -> None:
        """Delete a conversation the server keeps (a failure goes to ``on_error``)."""
        self._send(self._codec.encode(m.Forget(conversation)))

    def _start(self, msg: m.Chat | m.Generate, conversation: str | None) -> SyncGeneration:
        self._check_open()
        current = self._current
        if current is not None and not current.finished:
            raise Conflict(
                f"generation {current.id!r} is still running: read it to its end, "
                "cancel it or close() it first",
                generation_id=msg.id,
            )
        data = checked_frame(self._codec, msg, self.ready.limits.max_frame_bytes)
        gen = SyncGeneration(self, msg.id, msg.model, conversation)
        self._recent.pop(msg.id, None)
        self._current, self._current_start = gen, data
        self._send(data)
        return gen

    # -- the connection -----------------------------------------------------------------

    def _check_open(self) -> ClientConnection:
        if self._lost is not None or self._ws is None:
            lost = self._lost or ConnectionLost("not connected")
            raise ConnectionLost(
                lost.message, close_code=lost.close_code, close_reason=lost.close_reason
            )
        return self._ws

    def _send(self, data: bytes | str) -> None:
        ws = self._check_open()
        try:
            ws.send(data)
        except ConnectionClosed as exc:
            if self._try_resume(ws):
                if data is not self._current_start:  # a start is sent again by the resume
                    self._send(data)
                return
            self._fail(exc)
            raise self._check_open_error() from exc

    def _check_open_error(self) -> ConnectionLost:
        lost = self._lost or ConnectionLost("the connection closed")
        return ConnectionLost(
            lost.message, close_code=lost.close_code, close_reason=lost.close_reason
        )

    def _send_cancel(self, gen: SyncGeneration) -> None:
        # Remembered so that what still comes for it (text, done, a not_found
        # when the cancel crosses the end) is recognised and dropped.
        self._recent[gen.id] = gen
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        self._send(self._codec.encode(m.Cancel(gen.id)))

    def _abandon(self, gen: SyncGeneration) -> None:
        if self._current is gen:
            self._current = None
        if gen.finished:
            return
        with contextlib.suppress(ConnectionLost):
            self._send_cancel(gen)

    def _consumed(self, n: int) -> None:
        if self._window is not None:
            grant = self._window.consumed(n)
            if grant:
                with contextlib.suppress(ConnectionLost):
                    self._send(self._codec.encode(m.Credit(grant)))

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            lost = transport_error(exc)
            if not isinstance(lost, ConnectionLost):
                lost = ConnectionLost(lost.message)
            if self._last_error is not None:
                lost = ConnectionLost(
                    f"{lost.message} after {self._last_error!r}",
                    close_code=lost.close_code,
                    close_reason=lost.close_reason,
                )
                lost.__cause__ = self._last_error
            self._lost = lost
        self._end_current(self._lost)

    def _end_current(self, lost: ConnectionLost) -> None:
        gen = self._current
        if gen is None or gen.finished:
            return
        gen._ended = True
        gen.error = ConnectionLost(
            lost.message,
            generation_id=gen.id,
            close_code=lost.close_code,
            close_reason=lost.close_reason,
        )
        gen.error.__cause__ = lost.__cause__

    def _receive_for(self, gen: SyncGeneration) -> m.Delta | m.Done | FerrousClientError:
        """Read frames until one for ``gen``; handle the others on the way."""
        while True:
            if gen.finished and gen.error is not None and gen.done is None:
                return gen.error
            ws = self._ws
            if ws is None or self._lost is not None:
                return gen.error or self._check_open_error()
            try:
                data = ws.recv()
            except ConnectionClosed as exc:
                if not self._try_resume(ws):
                    self._fail(exc)
                continue
            try:
                msg = decode_server(self._codec, data)
            except BadRequest as exc:
                self._report(exc)
                continue
            item = self._dispatch(msg, gen)
            if item is not None:
                return item

    def _dispatch(
        self, msg: m.ServerMessage, gen: SyncGeneration
    ) -> m.Delta | m.Done | FerrousClientError | None:
        n = getattr(msg, "n", None)
        if n is not None:
            if not self._state.receive(n):
                return None  # already delivered before a resume
            if self._state.should_ack(isinstance(msg, m.Done)):
                with contextlib.suppress(ConnectionLost):
                    self._send(self._codec.encode(m.Ack(n)))
        match msg:
            case m.Delta():
                n = utf8_len(msg.text)
                if self._window is not None:
                    self._window.received(n)
                if msg.id == gen.id and not gen._abandoned:
                    return msg
                self._consumed(n)  # a generation left early: drop its text
            case m.Queued() | m.Started() | m.ToolCallEvent() if msg.id == gen.id:
                gen._note(msg)
            case m.Done():
                if msg.id == gen.id and not gen._abandoned:
                    if msg.finish_reason == "cancelled":
                        self._recent.pop(msg.id, None)
                    gen.done = msg
                    gen.conversation = msg.conversation or gen.conversation
                    gen._ended = True
                    return msg
                old = self._recent.get(msg.id)
                if old is not None:
                    old.done = old.done or msg
                    old._ended = True
                    if msg.finish_reason == "cancelled":
                        del self._recent[msg.id]
            case m.Error():
                err = error_from_message(msg)
                if msg.id is not None and msg.id == gen.id and not gen._ended:
                    gen.error = err
                    gen._ended = True
                    return err
                if msg.id is not None and msg.id in self._recent:
                    old = self._recent[msg.id]
                    if msg.code == ErrorCode.NOT_FOUND:
                        del self._recent[msg.id]  # the cancel crossed the end
                    else:
                        old.error = old.error or err
                        old._ended = True
                    return None
                self._report(err)
            case _:
                pass
        return None

    def _report(self, err: FerrousClientError) -> None:
        self._last_error = err
        if self.on_error is None:
            log.warning("server error: %r", err)
            return
        try:
            self.on_error(err)
        except Exception:
            log.exception("the on_error callback failed")
