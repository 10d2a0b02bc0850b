"""The asyncio client: one WebSocket connection carrying many concurrent generations.

One reader task decodes every server frame and hands it, by generation id,
to that generation's queue; one writer task sends frames in the order they
were made, so ``chat()`` can start a generation without awaiting. Each
:class:`Generation` is consumed with ``async for``::

    async with FerrousClient(url, token=token) as client:
        async for delta in client.chat("smollm2", "Hello"):
            print(delta.text, end="")

Memory: without flow control a generation's queue holds whatever the server
sent and the application has not read yet. With ``credits`` the server sends
at most that many bytes ahead of what the application has consumed, so the
bound holds end to end (see :mod:`ferrous_client.credits`).

Leaving an ``async for`` early (``break``, an exception, ``aclose()``) sends
``cancel`` for that generation, and whatever it still sends is dropped.

Resume: when the server offers it (``ready.resume_token``) and the connection
drops, the client reconnects within the server's ``resume_window`` and resumes
the session (:mod:`ferrous_client.resuming`): generations in flight go on
as one uninterrupted stream, each delta exactly once. When the session cannot
be resumed they fail with :class:`ResumeExpired`; when the server cannot be
reached in the window, with :class:`ConnectionLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from ferrous_client.backoff import Backoff, should_retry
from ferrous_client.credits import CreditWindow
from ferrous_client.errors import (
    BadRequest,
    Conflict,
    ConnectionLost,
    FerrousClientError,
)
from ferrous_client.generation import Generation, GenerationItem
from ferrous_client.handshake import CLIENT_NAME, Handshake, ready_or_refusal, transport_error
from ferrous_client.protocol import messages as m
from ferrous_client.protocol.errors import ErrorCode
from ferrous_client.resume import ResumeState
from ferrous_client.resuming import Outgoing, SessionResumer
from ferrous_client.voice import VoiceStream
from ferrous_client.voice import route as route_voice
from ferrous_client.wire import (
    AdaptersLike,
    IdSource,
    MessagesLike,
    OptionsLike,
    ToolsLike,
    checked_frame,
    decode_server,
    error_from_message,
    to_adapters,
    to_chat_messages,
    to_options,
    to_tools,
    utf8_len,
)

__all__ = ["DEFAULT_URL", "ErrorHandler", "FerrousClient", "Generation"]

log = logging.getLogger("ferrous_client")

DEFAULT_URL = "ws://127.0.0.1:11480/v1/ws"

ErrorHandler = Callable[[FerrousClientError], object]
"""Called with server errors that name no running generation (see ``on_error``)."""


# Ids of recently failed or cancelled generations, kept to recognise the
# messages that may still follow them (a done after an error, a not_found
# answering a cancel that crossed the done).
_RECENT = 256


class FerrousClient(SessionResumer):
    """A session with a FerrousForge server over one WebSocket connection.

    Credentials: ``token`` (a JWT, sent as ``Authorization: Bearer``),
    ``api_key`` (``X-API-Key``) or ``ticket`` (single use, ``?ticket=``).
    ``subprotocol``: ``"json"`` (text frames) or ``"msgpack"`` (binary frames).
    ``credits``: turn flow control on with a window of that many bytes.
    ``on_error``: called with server errors that belong to no running generation
    (e.g. ``forget`` of an unknown conversation); they are logged when it is None.
    ``backoff``: retry opening the session (see :meth:`connect_with_retry`).
    ``resume``: resume the session after a dropped connection when the server
    offers it (on by default).

    Use as ``async with FerrousClient(...) as client`` or ``await client.connect()``
    followed by ``await client.close()``.
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
        self._gens: dict[str, Generation] = {}
        self._voice: dict[str, VoiceStream] = {}  # listen and speak streams, by id
        self._recent: OrderedDict[str, Generation | None] = OrderedDict()
        self._waiting: set[Generation] = set()
        self._window: CreditWindow | None = None
        self._outgoing: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._lost: ConnectionLost | None = ConnectionLost("not connected")
        self._closing = False
        self._last_error: FerrousClientError | None = None
        self._resume = resume
        self._state = ResumeState()
        self._resuming: asyncio.Task[None] | None = None
        self._unsent: list[Outgoing] = []  # taken by the writer, not written: the link died
        # Start frames of generations in flight, to send again when a resume shows
        # that the server never got them.
        self._starts: dict[str, bytes | str] = {}
        #: How many times the session was resumed after a dropped connection.
        self.resumes = 0

    # -- the session --------------------------------------------------------------------

    @property
    def ready(self) -> m.Ready:
        """The server's ``ready``: session id, user, models, limits, flow control."""
        if self._ready is None:
            raise RuntimeError("not connected: use `async with client` or `await client.connect()`")
        return self._ready

    @property
    def connected(self) -> bool:
        """True while the session is usable (also while it resumes after a drop)."""
        return self._lost is None

    @property
    def subprotocol(self) -> str:
        return self._handshake.subprotocol

    @classmethod
    async def connect_with_retry(
        cls,
        url: str = DEFAULT_URL,
        *,
        attempts: int | None = None,
        backoff: Backoff | None = None,
        **options: Any,
    ) -> FerrousClient:
        """Open a session, retrying on connection errors and retryable server errors.

        Waits grow from 0.2 s to 5 s (exponential, with jitter) by default;
        ``attempts`` (5 by default) bounds the handshakes. A refused credential
        (:class:`Unauthorized`) or a bad request is raised at once. The client
        returned is connected: close it with ``await client.close()`` or
        ``async with``.
        """
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
        await client.connect()
        return client

    async def connect(self) -> Self:
        """Open the connection and the session (``hello`` -> ``ready``); no-op when open."""
        if self._lost is None:
            return self
        await self.close()  # what is left of a connection that was lost
        policy = self.backoff or Backoff(attempts=1)
        delays = policy.delays()
        for attempt in range(1, policy.attempts + 1):
            try:
                await self._open()
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
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def reconnect(self) -> Self:
        """Close (if open) and open a new session, with ``backoff`` when set.

        Generations in flight on the old connection end with :class:`ConnectionLost`
        and are not sent again; conversations live on the server and continue.
        """
        await self.close()
        return await self.connect()

    async def _open(self) -> None:
        ws, ready = await self._dial(self._handshake.hello())
        self._ready = ready
        self._lost = None
        self._closing = False
        self._last_error = None
        self._gens = {}
        self._starts = {}
        self._waiting = set()
        self._state = ResumeState()
        self._window = CreditWindow(self._handshake.credits) if self._handshake.credits else None
        self._outgoing = asyncio.Queue()
        self._run(ws)

    def _run(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws), name="ferrous-client-reader")
        self._writer = asyncio.create_task(
            self._write(ws, self._outgoing), name="ferrous-client-writer"
        )

    async def _dial(
        self, hello: m.Hello, refusals: list[FerrousClientError] | None = None
    ) -> tuple[ClientConnection, m.Ready]:
        """A new connection and its ``ready``; errors before it go to ``refusals`` when given."""
        hs = self._handshake
        try:
            ws = await connect(
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
        try:
            if ws.subprotocol != hs.subprotocol:
                raise BadRequest(f"the server did not accept subprotocol {hs.subprotocol}")
            await ws.send(self._codec.encode(hello))
            async with asyncio.timeout(self._open_timeout):
                while (ready := ready_or_refusal(self._codec, await ws.recv(), refusals)) is None:
                    pass
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await ws.close()
            if isinstance(exc, FerrousClientError):
                raise
            if isinstance(exc, Exception):
                raise transport_error(exc) from exc
            raise
        return ws, ready

    async def close(self) -> None:
        """Close the connection; generations still running end with :class:`ConnectionLost`."""
        if self._resuming is not None:
            self._closing = True
            self._resuming.cancel()
            await asyncio.gather(self._resuming, return_exceptions=True)
        ws, reader, writer = self._ws, self._reader, self._writer
        if ws is None or reader is None or writer is None:
            return
        self._closing = True
        self._outgoing.put_nowait(None)  # the writer sends what is queued (cancels), then stops
        await asyncio.wait([writer], timeout=self._close_timeout)
        writer.cancel()
        await ws.close()
        await asyncio.gather(reader, writer, return_exceptions=True)
        self._ws = self._reader = self._writer = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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
        adapters: AdaptersLike = None,
    ) -> Generation:
        """Start a chat turn in ``conversation`` (a new one when None); iterate the result.

        ``messages``: a user message (str), or ChatMessage / ``{"role", "content"}``
        items appended to the conversation the server keeps. ``tools``: functions
        the model may call (Tool or ``{"name", "description", "parameters"}``);
        the calls it makes are in ``Generation.tool_calls`` when it is done, and
        its ``finish_reason`` is ``"tool_calls"``; answer each with a
        ``{"role": "tool", "tool_call_id": ..., "content": ...}`` turn.
        ``adapters``: LoRA adapters for this turn instead of the model's own, each a
        model made with ADAPTER over the same base (a name, ``(name, scale)``, or an
        AdapterChoice); ``[]`` runs the base alone.
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
            adapters=to_adapters(adapters),
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
        adapters: AdaptersLike = None,
    ) -> Generation:
        """Complete a raw prompt (no chat template); iterate the result (``adapters``:
        as for :meth:`chat`)."""
        msg = m.Generate(
            id=id or self._ids.next(),
            model=model,
            prompt=prompt,
            options=to_options(options),
            token_ids=token_ids,
            priority=priority,
            adapters=to_adapters(adapters),
        )
        return self._start(msg, None)

    def listen(
        self,
        model: str,
        *,
        rate: int = 16000,
        reply: m.Reply | None = None,
        vad: m.VadOptions | None = None,
        language: str | None = None,
        partials: bool = True,
        id: str | None = None,
    ) -> VoiceStream:
        """Open a listen stream on speech-recognition ``model`` for audio at ``rate``.

        Send 16-bit mono PCM with :meth:`VoiceStream.send` and iterate the stream
        for speech edges and transcripts; with ``reply`` (a chat model and a voice)
        each utterance is answered in text and speech (see :mod:`ferrous_client.voice`).
        """
        msg = m.Listen(
            id=id or self._ids.next(),
            model=model,
            rate=rate,
            language=language,
            partials=partials,
            vad=vad,
            reply=reply,
        )
        return self._start_voice(msg, listening=True)

    def speak(
        self,
        model: str,
        text: str,
        *,
        speed: float = 1.0,
        format: m.AudioFormat = "pcm16",
        seed: int | None = None,
        id: str | None = None,
    ) -> VoiceStream:
        """``text`` spoken by speech-synthesis ``model``: iterate its ``audio`` chunks (or
        ``await stream.audio()`` for all of it)."""
        msg = m.Speak(
            id=id or self._ids.next(), model=model, text=text, speed=speed, format=format, seed=seed
        )
        return self._start_voice(msg, listening=False)

    def _start_voice(self, msg: m.Listen | m.Speak, *, listening: bool) -> VoiceStream:
        self._check_open()
        if msg.id in self._gens or msg.id in self._voice:
            raise Conflict(f"generation {msg.id!r} is still running", generation_id=msg.id)
        stream = VoiceStream(self, msg.id, listening=listening)
        self._voice[msg.id] = stream
        self._outgoing.put_nowait((self._codec.encode(msg), None))
        return stream

    async def _send_message(self, msg: m.ClientMessage) -> None:
        await self._send(self._codec.encode(msg), wait=True)

    async def cancel(self, id: str) -> bool:
        """Cancel generation ``id``; False when it is not running on this connection."""
        gen = self._gens.get(id)
        if gen is None or gen.finished:
            return False
        await self._send_cancel(id, wait=True)
        return True

    async def forget(self, conversation: str) -> None:
        """Delete a conversation the server keeps.

        The server answers only on failure (``not_found``), with an error that
        names no generation: it goes to ``on_error``.
        """
        await self._send(self._codec.encode(m.Forget(conversation)), wait=True)

    def _start(self, msg: m.Chat | m.Generate, conversation: str | None) -> Generation:
        self._check_open()
        if msg.id in self._gens:
            raise Conflict(f"generation {msg.id!r} is still running", generation_id=msg.id)
        data = checked_frame(self._codec, msg, self.ready.limits.max_frame_bytes)
        gen = Generation(self, msg.id, msg.model, conversation)
        self._gens[msg.id] = gen
        self._starts[msg.id] = data
        self._recent.pop(msg.id, None)
        self._outgoing.put_nowait((data, None))
        return gen

    # -- sending --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(
                self._lost.message,
                close_code=self._lost.close_code,
                close_reason=self._lost.close_reason,
            )

    async def _send(self, data: bytes | str, *, wait: bool) -> None:
        self._check_open()
        fut: asyncio.Future[None] | None = None
        if wait:
            fut = asyncio.get_running_loop().create_future()
        self._outgoing.put_nowait((data, fut))
        if fut is not None:
            await fut

    async def _send_cancel(self, gen_id: str, *, wait: bool) -> None:
        self._recent[gen_id] = self._gens.get(gen_id)
        self._trim_recent()
        await self._send(self._codec.encode(m.Cancel(gen_id)), wait=wait)

    def _send_cancel_nowait(self, gen_id: str) -> None:
        self._check_open()
        self._recent[gen_id] = self._gens.get(gen_id)
        self._trim_recent()
        self._outgoing.put_nowait((self._codec.encode(m.Cancel(gen_id)), None))

    def _grant(self, n: int) -> None:
        if n > 0 and self._lost is None:
            self._outgoing.put_nowait((self._codec.encode(m.Credit(n)), None))

    async def _write(self, ws: ClientConnection, outgoing: asyncio.Queue[Outgoing | None]) -> None:
        # What is left unsent when the link dies stays queued (and the frame in
        # hand goes to _unsent): a resume sends it on the next connection, and
        # _give_up fails whoever waits for it otherwise.
        while (item := await outgoing.get()) is not None:
            data, fut = item
            try:
                await ws.send(data)
            except ConnectionClosed:
                self._unsent.append(item)
                return
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- flow control ---------------------------------------------------------------------

    def _consumed(self, n: int) -> None:
        if self._window is not None:
            self._grant(self._window.consumed(n))

    def _check_starved(self) -> None:
        window = self._window
        if window is None or window.remaining > 0:
            return
        if any(g._queue.empty() for g in self._waiting):
            self._grant(window.starved())

    async def _wait_for(self, gen: Generation) -> GenerationItem:
        self._waiting.add(gen)
        try:
            self._check_starved()
            return await gen._queue.get()
        finally:
            self._waiting.discard(gen)

    # -- receiving ------------------------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                try:
                    msg = decode_server(self._codec, data)
                except BadRequest as exc:
                    self._report(exc)
                    continue
                self._dispatch(msg)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("the connection reader failed")
            with contextlib.suppress(Exception):
                await ws.close(1011)
        finally:
            self._connection_lost(ws)

    def _dispatch(self, msg: m.ServerMessage) -> None:
        n = getattr(msg, "n", None)
        if n is not None:
            if not self._state.receive(n):
                return  # already had it (a resume sends only what came after, but be sure)
            size = len(msg.data) if isinstance(msg, m.AudioOut) else 0
            if self._state.should_ack(isinstance(msg, m.Done), size):
                self._outgoing.put_nowait((self._codec.encode(m.Ack(n)), None))
        if self._voice and route_voice(self, msg):
            return
        match msg:
            case m.Delta():
                n = utf8_len(msg.text)
                if self._window is not None:
                    self._window.received(n)
                gen = self._gens.get(msg.id)
                if gen is None or gen._abandoned:
                    self._consumed(n)
                    return
                gen._deliver(msg)
                if self._waiting:
                    self._check_starved()
            case m.Queued() | m.Started() | m.ToolCallEvent():
                gen = self._gens.get(msg.id)
                if gen is not None:
                    gen._note(msg)
            case m.Restarted():
                gen = self._gens.get(msg.id)
                if gen is not None:
                    gen.restarted = msg
                    gen.tool_calls.clear()
            case m.Done():
                self._starts.pop(msg.id, None)
                gen = self._gens.pop(msg.id, None)
                if gen is None:
                    gen = self._recent.get(msg.id)
                    if gen is not None and gen.done is None:
                        gen.done = msg  # after an error: the usage, for the record
                    return
                if msg.finish_reason == "cancelled":
                    self._recent.pop(msg.id, None)
                gen._deliver(msg)
            case m.Error():
                self._error(msg)
            case _:
                pass

    def _error(self, msg: m.Error) -> None:
        err = error_from_message(msg)
        if msg.id is not None:
            self._starts.pop(msg.id, None)
        gen = self._gens.pop(msg.id, None) if msg.id is not None else None
        if gen is not None:
            # A done may still follow (an engine error): keep the id to match it.
            self._recent[gen.id] = gen
            self._trim_recent()
            gen._deliver(err)
            return
        if msg.id is not None and msg.code == ErrorCode.NOT_FOUND and msg.id in self._recent:
            # Our cancel crossed the generation's end: nothing was left to cancel.
            del self._recent[msg.id]
            return
        self._report(err)

    def _report(self, err: FerrousClientError) -> None:
        self._last_error = err
        if self.on_error is None:
            log.warning("server error: %r", err)
            return
        try:
            self.on_error(err)
        except Exception:
            log.exception("the on_error callback failed")

    def _trim_recent(self) -> None:
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
