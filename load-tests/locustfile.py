"""Load scenarios for FerrousForge: WebSocket protocol v1 and the OpenAI-compatible SSE route.

Run against a running server (see ``load-tests/README.md``)::

    locust -f load-tests/locustfile.py --headless -u 20 -r 5 -t 60s \\
        --host http://127.0.0.1:11480 --tags steady

Locust measures requests; an LLM server is judged per *generation*, whose
numbers are not one request's duration. So every user here fires its own
request events (``environment.events.request.fire``), which land in locust's
stats table, CSV files and web UI like HTTP requests do. Rows are named
``<scenario> <metric>`` under a type naming the transport (``ws-json``,
``ws-msgpack``, ``sse``):

* ``ttft``       request sent → first text, in ms (one per generation);
* ``itl``        gap between two consecutive text deltas, in ms (one per gap,
                 so the percentiles are those of all gaps);
* ``tokens/s``   decode rate of one generation, (completion tokens - 1) /
                 (last delta - first delta). Locust has no other numeric
                 column, so the *response time columns of this row hold
                 tokens per second*, not milliseconds;
* ``generation`` request sent → end, in ms; response length = text bytes.
                 A failed generation is a failure of this row, and the failure
                 text is the error code (``rate_limited``, ``engine_error``,
                 ``closed 1011``, ``handshake 401 unauthorized``…), so locust's
                 failures table counts failures by code.

Scenarios, selectable by tag (``--tags``) or by class name on the command line:

==========  =====================  ==================================================
tag         class                  what it does
==========  =====================  ==================================================
steady      SteadyChatUser         multi-turn chat on one session, think time between
burst       ConnectionBurstUser    connect, hello, one short generation, disconnect
cancel      CancelStormUser        cancel each generation at a random delta
slow        SlowReaderUser         a WebSocket client that reads a few bytes per second
sse         SseChatUser            ``POST /v1/chat/completions`` with ``stream: true``
mixed       SteadyChatUser +       WebSocket and HTTP clients at once
            SseChatUser
==========  =====================  ==================================================

Locust runs users as gevent greenlets and monkey-patches the standard library
before this file is imported, so every client here is a *blocking* one that
gevent makes cooperative: the WebSocket client is ``websockets``' Sans-I/O
protocol driven on a plain socket by the user's own greenlet (see
:class:`WsConnection` for why not ``websockets.sync``), and HTTP goes through
locust's ``requests`` session. Never import this file from the asyncio test
suite: run locust as a subprocess.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import itertools
import json
import os
import random
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from locust import HttpUser, User, between, constant, events, tag, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidState, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from protocol import messages as m
from protocol.codec import Codec, codec_for

WS_PATH = "/v1/ws"
SSE_PATH = "/v1/chat/completions"
PROMPTS = (
    "Say hello.",
    "Write one sentence about the sea.",
    "List three colours.",
    "What is a WebSocket, briefly?",
    "Tell me a very short story.",
)


# -- options --------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]  # locust
def _add_arguments(parser: LocustArgumentParser) -> None:
    """Options for these scenarios, also settable as ``LOCUST_FERROUS_*`` environment variables.

    Not ``FERROUS_*``: the server reads every ``FERROUS_*`` variable as configuration and
    refuses unknown ones, so ``FERROUS_TOKEN`` in a shell would stop ``ferrous serve`` there.
    """

    def opt(name: str, **kw: Any) -> None:
        env = "LOCUST_" + name.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(name, env_var=env, **kw)

    opt(
        "--ferrous-token",
        default="",
        is_secret=True,
        help="JWT or API key sent as 'Authorization: Bearer' (empty: none, for --no-auth servers)",
    )
    opt("--ferrous-model", default="", help="model name (default: the first the server lists)")
    opt(
        "--ferrous-encoding",
        default="both",
        choices=("json", "msgpack", "both"),
        help="WebSocket subprotocol; 'both' alternates users between JSON and MessagePack",
    )
    opt("--ferrous-max-tokens", type=int, default=64, help="max_tokens of chat generations")
    opt("--ferrous-think-min", type=float, default=1.0, help="steady/sse think time, lower (s)")
    opt("--ferrous-think-max", type=float, default=3.0, help="steady/sse think time, upper (s)")
    opt("--ferrous-turns", type=int, default=4, help="steady: chat turns before a new conversation")
    opt("--ferrous-cancel-max", type=int, default=32, help="cancel: cancel after 0..N deltas")
    opt("--ferrous-slow-rate", type=int, default=64, help="slow: bytes read per second")
    opt("--ferrous-slow-seconds", type=float, default=10.0, help="slow: how long to read slowly")
    opt("--ferrous-slow-max-tokens", type=int, default=1000, help="slow: max_tokens")
    opt("--ferrous-timeout", type=float, default=60.0, help="seconds without a message = failure")


@events.init.add_listener  # type: ignore[untyped-decorator]  # locust
def _drop_users_without_tasks(environment: Environment, **_: Any) -> None:
    """With ``--tags``/``--exclude-tags``, keep only the user classes that still have a task.

    Locust filters tasks by tag but still spawns every class, and a class left
    without tasks spawns users that fail at once; so ``--tags cancel`` would
    also start failing chat users. Same rule as locust's own filter.
    """
    o = environment.parsed_options
    tags = set(o.tags) if o is not None and o.tags else None
    excluded = set(o.exclude_tags) if o is not None and o.exclude_tags else None

    def runs(t: object) -> bool:
        have: set[str] = getattr(t, "locust_tag_set", set())
        return (tags is None or bool(have & tags)) and not (excluded and have & excluded)

    kept = [cls for cls in environment.user_classes if any(runs(t) for t in cls.tasks)]
    if kept:
        environment.user_classes[:] = kept


@events.test_stop.add_listener  # type: ignore[untyped-decorator]  # locust
def _wait_for_final_csv(environment: Environment, **_: Any) -> None:
    """Hold the shutdown until the ``--csv`` stats file on disk has the final totals.

    Locust writes the CSV files from a greenlet once a second and takes no last
    snapshot at exit, so the end of a run (seconds of it on a busy machine)
    can be missing from the CSV while the printed summary has it. Each
    snapshot is written whole before that greenlet sleeps again, so once the
    ``Aggregated`` row matches the final count the failures file is final too.
    """
    o = environment.parsed_options
    prefix = getattr(o, "csv_prefix", None) if o is not None else None
    if not prefix:
        return
    path = f"{prefix}_stats.csv"
    want = str(environment.stats.total.num_requests)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(path, newline="") as f:
                if any(
                    r.get("Name") == "Aggregated" and r.get("Request Count") == want
                    for r in csv.DictReader(f)
                ):
                    return
        except OSError:
            pass
        time.sleep(0.1)  # cooperative: the CSV writer's greenlet runs meanwhile


@dataclass(frozen=True)
class Settings:
    """The parsed options, read once per user."""

    token: str
    model: str
    encoding: str
    max_tokens: int
    think_min: float
    think_max: float
    turns: int
    cancel_max: int
    slow_rate: int
    slow_seconds: float
    slow_max_tokens: int
    timeout: float

    @classmethod
    def of(cls, environment: Environment) -> Settings:
        o = environment.parsed_options
        if o is None:  # locust used as a library: defaults, credentials from the environment
            return cls(
                os.environ.get("LOCUST_FERROUS_TOKEN", ""),
                os.environ.get("LOCUST_FERROUS_MODEL", ""),
                "both",
                *(64, 1.0, 3.0, 4, 32, 64, 10.0, 1000, 60.0),
            )
        return cls(
            o.ferrous_token,
            o.ferrous_model,
            o.ferrous_encoding,
            o.ferrous_max_tokens,
            o.ferrous_think_min,
            o.ferrous_think_max,
            o.ferrous_turns,
            o.ferrous_cancel_max,
            o.ferrous_slow_rate,
            o.ferrous_slow_seconds,
            o.ferrous_slow_max_tokens,
            o.ferrous_timeout,
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def think(self) -> float:
        return random.uniform(self.think_min, max(self.think_min, self.think_max))


# -- reporting ------------------------------------------------------------------------------


class LoadFailure(Exception):
    """A failure as locust shows it: its repr is the error code alone.

    Locust groups failures by ``repr(exception)``; server messages carry
    numbers (``the prompt has 402 tokens``), so only the code is kept and the
    failures table reads as a count per code.
    """

    def __repr__(self) -> str:
        return str(self.args[0]) if self.args else "failure"

    __str__ = __repr__


class Reporter:
    """Fires locust request events for one transport and scenario."""

    def __init__(self, environment: Environment, kind: str, scenario: str) -> None:
        self.environment = environment
        self.kind = kind
        self.scenario = scenario

    def fire(self, metric: str, value: float, length: int = 0, failure: str | None = None) -> None:
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]  # locust
            request_type=self.kind,
            name=f"{self.scenario} {metric}",
            response_time=value,
            response_length=length,
            exception=LoadFailure(failure) if failure else None,
            context={},
        )


def _ms(seconds: float) -> float:
    return seconds * 1000.0


@dataclass
class Generation:
    """What a client saw of one generation, timed on the client's clock."""

    sent: float
    deltas: list[float] = field(default_factory=list)  # arrival time of each delta with text
    text_bytes: int = 0
    completion_tokens: int = 0
    finish: str | None = None  # done.finish_reason, or None when it ended otherwise
    failure: str | None = None  # error code / close / timeout, when it failed
    end: float = 0.0
    cancelled_at: float | None = None
    deltas_after_cancel: int = 0

    def report(self, rep: Reporter, *, expect_cancel: bool = False, rate: bool = True) -> None:
        """Report this generation's ttft, itl gaps, tokens/s, and its outcome.

        ``rate=False`` leaves out tokens/s, for scenarios whose generations are
        a few tokens long: their deltas arrive in one read, and the rate over
        a near-zero span is noise in the millions.
        """
        if self.deltas:
            rep.fire("ttft", _ms(self.deltas[0] - self.sent))
            for a, b in itertools.pairwise(self.deltas):
                rep.fire("itl", _ms(b - a))
            span = self.deltas[-1] - self.deltas[0]
            if rate and self.completion_tokens > 1 and span > 0:
                rep.fire("tokens/s", (self.completion_tokens - 1) / span)
        failure = self.failure
        if failure is None and self.finish in ("error", "stalled"):
            failure = f"finish {self.finish}"
        if failure is None and self.finish == "cancelled" and not expect_cancel:
            failure = "finish cancelled"
        rep.fire("generation", _ms(self.end - self.sent), self.text_bytes, failure)


# -- WebSocket transport (websockets' Sans-I/O protocol on a plain socket) -------------------

_encodings = itertools.count()


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


class _WsUser(User):
    """A WebSocket client that keeps one session open and reconnects when it breaks."""

    abstract = True
    scenario: ClassVar[str] = "ws"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = Settings.of(environment)
        enc = self.settings.encoding
        if enc == "both":
            enc = ("json", "msgpack")[next(_encodings) % 2]
        self.subprotocol = m.SUBPROTOCOL_MSGPACK if enc == "msgpack" else m.SUBPROTOCOL_JSON
        self.rep = Reporter(environment, f"ws-{enc}", self.scenario)
        self.session: WsSession | None = None

    def open_session(self) -> WsSession | None:
        """Connect and say hello, reporting ``connect`` and ``hello``; None when refused."""
        t0 = time.perf_counter()
        try:
            session = WsSession.open(ws_url(self.host or ""), self.settings, self.subprotocol)
        except (InvalidHandshake, OSError, Closed) as exc:
            self.rep.fire("connect", _ms(time.perf_counter() - t0), failure=handshake_failure(exc))
            return None
        t1 = time.perf_counter()
        self.rep.fire("connect", _ms(t1 - t0))
        try:
            session.hello(f"locust/{self.scenario}")
        except (LoadFailure, OSError, Closed, InvalidState) as exc:
            self.rep.fire("hello", _ms(time.perf_counter() - t1), failure=io_failure(exc))
            session.close()
            return None
        self.rep.fire("hello", _ms(time.perf_counter() - t1))
        return session

    def ensure_session(self) -> WsSession | None:
        if self.session is None:
            self.session = self.open_session()
            if self.session is None:
                time.sleep(1.0)  # refused: do not hammer the handshake in a tight loop
        return self.session

    def model(self, session: WsSession) -> str:
        if self.settings.model:
            return self.settings.model
        if session.ready and session.ready.models:
            return session.ready.models[0]
        raise LoadFailure("no model: pass --ferrous-model")

    def drop_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def after(self, gen: Generation) -> None:
        """Reconnect on the next task when the connection broke."""
        if gen.failure and (gen.failure.startswith("closed") or gen.failure == "timeout"):
            self.drop_session()

    def on_stop(self) -> None:
        self.drop_session()


class SteadyChatUser(_WsUser):
    """Steady chat: multi-turn conversations with think time, as an interactive user would.

    Proves the everyday numbers: ttft and inter-token latency under a given
    number of concurrent people, with conversations kept on the server (each
    turn re-renders a growing history; after ``--ferrous-turns`` turns the
    conversation is forgotten and a new one starts).
    """

    scenario = "steady"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.conversation: str | None = None
        self.turn = 0

    def wait_time(self) -> float:
        return self.settings.think()

    @tag("steady", "mixed")
    @task
    def chat(self) -> None:
        session = self.ensure_session()
        if session is None:
            return
        if self.turn >= self.settings.turns and self.conversation:
            try:
                session.send(m.Forget(self.conversation))
            except (OSError, InvalidState):
                self.drop_session()
                return
            self.conversation, self.turn = None, 0
        request = m.Chat(
            id=session.new_id(),
            model=self.model(session),
            messages=[m.ChatMessage("user", random.choice(PROMPTS))],
            conversation=self.conversation,
            options=m.Options(max_tokens=self.settings.max_tokens),
        )
        gen, self.conversation = session.run(request)
        self.turn += 1
        gen.report(self.rep)
        self.after(gen)


class ConnectionBurstUser(_WsUser):
    """Connection burst: connect, authenticate, hello, one short generation, disconnect.

    Spawned at a high rate (``-r`` close to ``-u``) this hammers the handshake
    and authentication path and session set-up/tear-down, which steady chat
    barely touches; ``connect`` and ``hello`` show their latency, and refusals
    (``handshake 503 overloaded`` at ``limits.max_sessions``) their count.
    """

    scenario = "burst"
    wait_time = constant(0)

    @tag("burst")
    @task
    def burst(self) -> None:
        session = self.open_session()
        if session is None:
            time.sleep(1.0)
            return
        try:
            request = m.Generate(
                id=session.new_id(),
                model=self.model(session),
                prompt=random.choice(PROMPTS),
                options=m.Options(max_tokens=8),
            )
            gen, _ = session.run(request)
            gen.report(self.rep, rate=False)
        finally:
            session.close()


class CancelStormUser(_WsUser):
    """Cancel storm: every generation is cancelled at a random delta (0: before ``started``).

    Proves that cancellation is prompt and clean under load: each cancelled
    generation must end with exactly the ``done`` the protocol promises
    (``cancelled``). ``cancel cancelled`` times cancel → done, with the
    number of deltas that still arrived after the cancel as its response
    length; ``cancel late`` is the same for a generation that ended on its
    own (``length``) after the cancel was sent, the engine having finished
    before the cancel reached it; ``cancel finished first`` counts
    generations that ended before their cancel point. A cancel is never a
    failure here; a lost ``done`` is (``timeout``).
    """

    scenario = "cancel"
    wait_time = between(0.0, 0.2)

    @tag("cancel")
    @task
    def cancel(self) -> None:
        session = self.ensure_session()
        if session is None:
            return
        cancel_after = random.randint(0, max(0, self.settings.cancel_max))
        request = m.Generate(
            id=session.new_id(),
            model=self.model(session),
            prompt=random.choice(PROMPTS),
            options=m.Options(max_tokens=max(64, 4 * self.settings.cancel_max), ignore_eos=True),
        )
        gen, _ = session.run(request, cancel_after=cancel_after)
        gen.report(self.rep, expect_cancel=True, rate=False)
        if gen.failure is None and gen.finish in ("cancelled", "stop", "length"):
            if gen.cancelled_at is None:  # ended before its cancel point
                self.rep.fire("finished first", _ms(gen.end - gen.sent))
            else:
                # "late": the cancel was sent, but the generation ended on its own
                # (the engine had produced everything before the cancel reached it).
                name = "cancelled" if gen.finish == "cancelled" else "late"
                self.rep.fire(name, _ms(gen.end - gen.cancelled_at), gen.deltas_after_cancel)
        self.after(gen)


# -- slow reader -----------------------------------------------------------------------------------


SLOW_RCVBUF = 4096  # bytes; the kernel may round it, but it stays far below the default


class SlowReaderUser(User):
    """Slow readers: a client that reads its generation at a few bytes per second.

    Nothing in the protocol stops a client from reading slowly; the server
    must then push back (the engine pauses the generation once its ring is
    full) rather than buffer without bound, must keep serving everyone else
    at full speed, and must end a generation stalled for longer than
    ``stall_timeout`` with ``finish_reason: "stalled"``. Each user shrinks its
    socket's receive buffer, reads ``--ferrous-slow-rate`` bytes/s for
    ``--ferrous-slow-seconds``, then drains the rest at full speed to see how
    the generation ended: ``slow finish stop|length|stalled`` (all expected
    outcomes for a slow reader, so not failures; ``error`` is one). Run it
    beside ``steady`` (``--tags slow steady``) to see whether the others' ttft
    and itl move, and watch the server's RSS.
    """

    wait_time = between(0.0, 0.5)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = Settings.of(environment)
        self.rep = Reporter(environment, "ws-json", "slow")

    @tag("slow")
    @task
    def read_slowly(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        try:
            session = WsSession.open(
                ws_url(self.host or ""), s, m.SUBPROTOCOL_JSON, rcvbuf=SLOW_RCVBUF
            )
        except (InvalidHandshake, OSError, Closed) as exc:
            self.rep.fire("connect", _ms(time.perf_counter() - t0), failure=handshake_failure(exc))
            time.sleep(1.0)
            return
        try:
            try:
                ready = session.hello("locust/slow")
            except (LoadFailure, OSError, Closed, InvalidState) as exc:
                self.rep.fire("connect", _ms(time.perf_counter() - t0), failure=io_failure(exc))
                return
            self.rep.fire("connect", _ms(time.perf_counter() - t0))
            self._generate(session, s.model or (ready.models[0] if ready.models else "missing"))
        finally:
            session.close()

    def _generate(self, session: WsSession, model: str) -> None:
        s = self.settings
        sent = time.perf_counter()
        first: float | None = None
        finish: str | None = None
        failure: str | None = None
        tick = 0.25
        slow_until = sent + s.slow_seconds
        deadline = slow_until + s.timeout
        try:
            session.send(
                m.Generate(
                    id="slow",
                    model=model,
                    prompt=random.choice(PROMPTS),
                    options=m.Options(max_tokens=s.slow_max_tokens, ignore_eos=True),
                )
            )
            while finish is None and failure is None:
                now = time.perf_counter()
                if now > deadline:
                    failure = "timeout"
                    break
                if now < slow_until:  # a trickle: rate * tick bytes, then sleep out the tick
                    session.conn.read(max(1, int(s.slow_rate * tick)), tick)
                    time.sleep(max(0.0, tick - (time.perf_counter() - now)))
                else:
                    session.conn.read(65536, max(0.01, deadline - now))
                for msg in session.pending():
                    if isinstance(msg, m.Delta) and first is None:
                        first = time.perf_counter()
                        self.rep.fire("ttfb", _ms(first - sent))
                    elif isinstance(msg, m.Done):
                        finish = msg.finish_reason
                    elif isinstance(msg, m.Error):
                        failure = msg.code.value
        except (OSError, Closed, InvalidState) as exc:
            failure = io_failure(exc)
        if finish == "error":
            failure = failure or "finish error"
        self.rep.fire(
            "finish " + (finish or "none"),
            _ms(time.perf_counter() - sent),
            session.conn.bytes_read,
            failure,
        )


# -- OpenAI-compatible SSE -------------------------------------------------------------------


class SseChatUser(HttpUser):
    """OpenAI-compatible streaming chat: ``POST /v1/chat/completions`` with ``stream: true``.

    Proves the HTTP surface under the same load as the WebSocket one, with the
    same per-generation numbers (``sse ttft``, ``sse itl``, ``sse tokens/s``,
    ``sse generation``); the ``POST`` row itself is the time to the response
    headers, which the server sends once the first token exists. Errors
    inside the stream (``data: {"error": …}``) are failures by code.
    """

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)  # type: ignore[no-untyped-call]  # locust
        self.settings = Settings.of(environment)
        self.rep = Reporter(environment, "sse", "sse")
        self.model_name = self.settings.model

    def wait_time(self) -> float:
        return self.settings.think()

    def on_start(self) -> None:
        if not self.model_name:
            with self.client.get(
                "/v1/models", headers=self.settings.headers(), catch_response=True
            ) as r:
                data = r.json().get("data") if r.ok else None
                if data:
                    self.model_name = data[0]["id"]
                else:
                    r.failure(f"{r.status_code} no model")

    @tag("sse", "mixed")
    @task
    def chat(self) -> None:
        body = {
            "model": self.model_name or "missing",
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": self.settings.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        gen = Generation(sent=time.perf_counter())
        with self.client.post(
            SSE_PATH,
            json=body,
            headers=self.settings.headers(),
            stream=True,
            catch_response=True,
            timeout=self.settings.timeout,
        ) as r:
            if not r.ok:
                try:
                    code = r.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "?"
                gen.failure = f"{r.status_code} {code}"
                r.failure(gen.failure)
            else:
                try:
                    self._read(r.iter_content(chunk_size=None), gen)
                except OSError as exc:  # requests' errors are OSErrors
                    gen.failure = f"stream {type(exc).__name__}"
                r.success()
        gen.end = time.perf_counter()
        gen.report(self.rep)

    @staticmethod
    def _read(chunks: Iterator[bytes], gen: Generation) -> None:
        """Parse SSE events as they arrive (each is one HTTP chunk, not line-buffered)."""
        buf = b""
        for chunk in chunks:
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ").strip()
                if data == b"[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    gen.failure = str(obj["error"].get("code", "?"))
                    continue
                if obj.get("usage"):
                    gen.completion_tokens = int(obj["usage"]["completion_tokens"])
                for choice in obj.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        gen.deltas.append(time.perf_counter())
                        gen.text_bytes += len(text.encode())
                    if choice.get("finish_reason"):
                        gen.finish = choice["finish_reason"]
        if gen.failure is None:
            gen.failure = "stream ended without [DONE]"
