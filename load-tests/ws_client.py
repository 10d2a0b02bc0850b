"""The WebSocket client: ``websockets``' Sans-I/O protocol on a plain socket, and a v1 session.

Messages are encoded and decoded with the project's own codec
(``protocol.codec.codec_for``), so the load users speak exactly the protocol
the server checks. See :class:`WsConnection` for why not ``websockets.sync``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import socket
import ssl
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

from options import Settings
from reporting import Generation, LoadFailure
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from protocol import messages as m
from protocol.codec import Codec, codec_for

WS_PATH = "/v1/ws"


def ws_url(host: str) -> str:
    """``http://h:p`` (locust's --host) → ``ws://h:p/v1/ws``."""
    parts = urlsplit(host)
    scheme = "wss" if parts.scheme in ("https", "wss") else "ws"
    return f"{scheme}://{parts.netloc}{WS_PATH}"


class Closed(Exception):
    """The connection ended: the server's close code, or 1006 when it just went away."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def handshake_failure(exc: Exception) -> str:
    """``handshake 401 unauthorized`` from a refused upgrade (the body names the code)."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        try:
            code = json.loads(exc.response.body or b"{}")["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "?"
        return f"handshake {status} {code}"
    if isinstance(exc, TimeoutError):
        return "handshake timeout"
    if isinstance(exc, Closed):
        return f"handshake closed {exc.code}"
    return f"handshake {type(exc).__name__}"


def io_failure(exc: BaseException) -> str:
    """The failure text for an exception raised while a session was open."""
    if isinstance(exc, LoadFailure):
        return repr(exc)
    if isinstance(exc, Closed):
        return f"closed {exc.code}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "closed 1006"  # OSError: reset, broken pipe; InvalidState: sending after a close


class WsConnection:
    """A WebSocket client: ``websockets``' Sans-I/O protocol, I/O done by the calling greenlet.

    Why not ``websockets.sync``: it reads in a background thread blocked in a
    selector and closes the socket from another thread. Under gevent that
    closes a descriptor a libev watcher still waits on, and libev aborts the
    whole locust process (``epoll_modify: Assertion ... invalid fd``, exit
    134) at the end of a run. Here nothing runs behind the caller's back: the
    socket is read only inside :meth:`read`, which also answers pings, so a
    caller that reads slowly *is* a slow reader as far as TCP is concerned.
    The ``websockets`` protocol object still does the handshake checks,
    framing, masking and the close handshake.
    """

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        subprotocol: str,
        timeout: float,
        rcvbuf: int | None = None,
    ) -> None:
        uri = parse_uri(url)
        family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf:  # before connect, so that the advertised window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        try:
            sock.connect((uri.host, uri.port))
            if uri.secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=uri.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.bytes_read = 0
        self._messages: collections.deque[str | bytes] = collections.deque()
        self._fragments: list[Frame] = []
        self.protocol = ClientProtocol(uri, subprotocols=[Subprotocol(subprotocol)], max_size=None)
        try:
            request = self.protocol.connect()
            for name, value in headers.items():
                request.headers[name] = value
            self.protocol.send_request(request)
            self._flush()
            deadline = time.monotonic() + timeout
            while self.protocol.state is State.CONNECTING and self.protocol.handshake_exc is None:
                got = self.read(65536, deadline - time.monotonic())
                if got == 0 and time.monotonic() >= deadline:
                    raise TimeoutError("no handshake response")
            if self.protocol.handshake_exc is not None:
                raise self.protocol.handshake_exc
        except BaseException:
            sock.close()
            raise

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)
            else:  # the protocol asks for a half-close
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)

    def read(self, n: int, timeout: float) -> int:
        """Read at most ``n`` bytes, waiting at most ``timeout`` s; how many arrived (0: none).

        Complete messages are queued for :meth:`pop`; pings are answered.
        Raises :class:`Closed` once the server closed or the connection dropped
        and no message is left to pop.
        """
        if self.protocol.state is State.CLOSED or self.protocol.close_rcvd is not None:
            if self._messages:
                return 0
            raise Closed(self.protocol.close_code or 1006)
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(n)
        except TimeoutError:
            return 0
        except OSError:
            data = b""
        if data:
            self.bytes_read += len(data)
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        with contextlib.suppress(OSError):
            self._flush()  # pongs, and the answer to a close
        for event in self.protocol.events_received():
            if not isinstance(event, Frame) or event.opcode not in (
                Opcode.TEXT,
                Opcode.BINARY,
                Opcode.CONT,
            ):
                continue  # the handshake response, control frames
            self._fragments.append(event)
            if event.fin:
                payload = b"".join(f.data for f in self._fragments)
                text = self._fragments[0].opcode is Opcode.TEXT
                self._messages.append(payload.decode() if text else payload)
                self._fragments.clear()
        if not data and not self._messages:
            raise Closed(self.protocol.close_code or 1006)
        return len(data)

    def pop(self) -> str | bytes | None:
        """The oldest complete message read so far, if any."""
        return self._messages.popleft() if self._messages else None

    def recv(self, timeout: float) -> str | bytes:
        """The next message, reading as fast as it comes; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self._messages:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message")
            self.read(65536, remaining)
        return self._messages.popleft()

    def send(self, payload: str | bytes) -> None:
        """A text frame for str, a binary frame for bytes."""
        if isinstance(payload, str):
            self.protocol.send_text(payload.encode())
        else:
            self.protocol.send_binary(payload)
        self._flush()

    def close(self) -> None:
        """Send a close frame (best effort) and drop the socket: the server cancels our work."""
        with contextlib.suppress(Exception):
            if self.protocol.state is State.OPEN:
                self.protocol.send_close(1000)
                self._flush()
        self.sock.close()


class WsSession:
    """One protocol v1 session: the codec of its subprotocol over a :class:`WsConnection`."""

    def __init__(self, conn: WsConnection, codec: Codec, timeout: float) -> None:
        self.conn = conn
        self.codec = codec
        self.timeout = timeout
        self.ready: m.Ready | None = None
        self._ids = itertools.count(1)

    @classmethod
    def open(
        cls, url: str, settings: Settings, subprotocol: str, rcvbuf: int | None = None
    ) -> WsSession:
        conn = WsConnection(url, settings.headers(), subprotocol, settings.timeout, rcvbuf)
        return cls(conn, codec_for(subprotocol), settings.timeout)

    def new_id(self) -> str:
        return f"g{next(self._ids)}"

    def send(self, msg: m.ClientMessage) -> None:
        self.conn.send(self.codec.encode(msg))

    def recv(self) -> m.ServerMessage:
        return self.codec.decode_server(self.conn.recv(self.timeout))

    def pending(self) -> Iterator[m.ServerMessage]:
        """The messages already read, without reading more."""
        while (payload := self.conn.pop()) is not None:
            yield self.codec.decode_server(payload)

    def hello(self, client: str) -> m.Ready:
        self.send(m.Hello(client=client))
        msg = self.recv()
        if not isinstance(msg, m.Ready):
            raise LoadFailure(f"hello answered with {type(msg).__name__}")
        self.ready = msg
        return msg

    def close(self) -> None:
        self.conn.close()

    def run(
        self, request: m.Generate | m.Chat, cancel_after: int | None = None
    ) -> tuple[Generation, str | None]:
        """Send ``request`` and read until its end; (what was seen, the conversation id).

        ``cancel_after``: send ``cancel`` once this many deltas arrived (0: right
        after the request, before ``started``). Messages about other ids, such as
        a ``done`` after an ``error`` already ended a generation, are ignored.
        """
        gen = Generation(sent=time.perf_counter())
        conversation: str | None = getattr(request, "conversation", None)
        try:
            self.send(request)
            if cancel_after == 0:
                self._cancel(request.id, gen)
            while True:
                msg = self.recv()
                now = time.perf_counter()
                if isinstance(msg, m.Delta) and msg.id == request.id:
                    if msg.text:
                        gen.deltas.append(now)
                        gen.text_bytes += len(msg.text.encode())
                    if gen.cancelled_at is not None:
                        gen.deltas_after_cancel += 1
                    elif cancel_after is not None and len(gen.deltas) >= cancel_after:
                        self._cancel(request.id, gen)
                elif isinstance(msg, m.Started) and msg.id == request.id:
                    conversation = msg.conversation or conversation
                elif isinstance(msg, m.Done) and msg.id == request.id:
                    gen.finish = msg.finish_reason
                    gen.completion_tokens = msg.usage.completion_tokens
                    conversation = msg.conversation or conversation
                    break
                elif isinstance(msg, m.Error) and msg.id == request.id:
                    if msg.code.value == "not_found":  # our cancel came after the end
                        continue
                    gen.failure = msg.code.value
                    break
                elif isinstance(msg, m.Error) and msg.id is None:
                    gen.failure = msg.code.value
                    break
        except (OSError, Closed, InvalidState) as exc:
            gen.failure = io_failure(exc)
        gen.end = time.perf_counter()
        return gen, conversation

    def _cancel(self, gen_id: str, gen: Generation) -> None:
        self.send(m.Cancel(gen_id))
        gen.cancelled_at = time.perf_counter()
