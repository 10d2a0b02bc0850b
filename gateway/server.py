"""Running the gateway: engine, authenticator and one uvicorn server on one port.

uvicorn serves HTTP with httptools and WebSocket with the ``websockets``
package's protocol core (uvicorn's ``websockets-sansio`` protocol, trimmed
for many idle sessions: see :class:`_LeanWebSocketProtocol`), on the running
uvloop loop. Shutdown (SIGTERM or SIGINT) runs in a fixed order: stop listening,
refuse new generations, let in-flight ones finish for ``grace_period``
seconds, cancel the rest, close every WebSocket with 1001, stop the workers,
exit 0. A second signal skips the wait.

A connection that has not sent its complete HTTP request head within
``limits.handshake_timeout`` seconds of opening (or of its previous response,
on a keep-alive connection) gets a 408 and is closed: uvicorn's own
``timeout_keep_alive`` covers only the quiet time between requests, so without
this a client that sends half a request line holds its socket forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State
from websockets.streams import StreamReader

from engine import EngineClient, EngineConfig
from engine.backends.onnx_entry import OnnxOptions
from engine.client import default_threads, default_workers
from gateway.app import GatewayApp, error_body
from gateway.auth import Authenticator
from gateway.config import ConfigError, ServerConfig, ferrous_home, parse_size
from gateway.logs import configure_logging
from gateway.process_tuning import GcTuner, raise_fd_limit
from gateway.scopes import ALL_SCOPES
from gateway.sessions import CONNECTION_EXTENSION
from protocol.durations import parse_duration
from protocol.errors import ErrorCode

__all__ = [
    "RunningServer",
    "build_authenticator",
    "running_server",
    "serve",
]

log = logging.getLogger("ferrous.server")


def build_authenticator(config: ServerConfig) -> Authenticator:
    a = config.auth
    return Authenticator(
        home=ferrous_home(config),
        enabled=a.enabled,
        secret_file=a.secret_file,
        algorithms=a.algorithms,
        public_key_file=a.public_key_file,
        jwks_file=a.jwks_file,
        audience=a.audience,
        issuer=a.issuer,
        leeway=a.leeway,
        tenant_claim=a.tenant_claim,
        api_keys_file=a.api_keys_file,
        ticket_ttl=a.ticket_ttl,
        max_tickets_per_user=a.max_tickets_per_user,
        max_token_lifetime=a.max_token_lifetime,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """uvicorn's server with our shutdown order instead of its immediate one."""

    def __init__(self, config: uvicorn.Config, gateway: GatewayApp, grace: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.grace = grace
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded as a captured signal: after a graceful drain the process exits 0.
        if self._drain is not None or self._loop is None:
            self.should_exit = True
            self.force_exit = self._drain is not None
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._shutdown())

    async def shutdown_gracefully(self) -> None:
        """Drain once: a signal may already have started it."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._drain)

    async def _shutdown(self) -> None:
        log.info("shutting down: draining for up to %.1f s", self.grace)
        for server in getattr(self, "servers", []):
            server.close()  # stop accepting connections
        await self.gateway.drain(self.grace)
        self.should_exit = True


@dataclass
class RunningServer:
    gateway: GatewayApp
    host: str
    port: int
    task: asyncio.Task[None]  # ends when the server has stopped
    grpc_port: int | None = None  # the gRPC API's, when enabled

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/ws"


def _check_bind(config: ServerConfig) -> None:
    if not config.auth.enabled and not _is_loopback(config.host):
        raise ConfigError(
            f"refusing to listen on {config.host} with auth disabled: enable auth or bind 127.0.0.1"
        )


def _engine_config(config: ServerConfig) -> EngineConfig:
    host = None
    ray = config.ray
    if ray.enabled:
        from engine.rayhost import RayHost  # ray only where it is on

        host = RayHost(
            ray.address,
            advertise=ray.advertise or ray.listen,
            num_cpus=ray.num_cpus,
            resources=dict(ray.resources),
        )
    return EngineConfig(
        host=host,
        worker_listen=ray.listen,
        workers=config.workers or default_workers(),
        threads_per_worker=config.threads_per_worker or default_threads(),
        seqs_per_worker=config.seqs_per_worker,
        prefill_chunk=config.prefill_chunk,
        kv_unified=config.kv_unified,
        read_ahead=config.read_ahead,
        ring_capacity=config.ring_capacity,
        stall_timeout=config.stall_timeout,
        prepare_timeout=config.limits.prompt_prepare_timeout,
        max_queued=config.limits.max_queued_generations,
        health_interval=config.health_interval,
        health_timeout=config.health_timeout,
        memory_budget=parse_size(config.memory_budget),
        keep_alive=parse_duration(config.keep_alive),
        options={
            "onnx": OnnxOptions(
                spinning=config.onnx.spinning,
                graph_optimization=config.onnx.graph_optimization,
                memory_arena=config.onnx.memory_arena,
                prefix_cache_mb=config.onnx.prefix_cache_mb,
                prefix_reuse=config.onnx.prefix_reuse,
                providers=list(config.onnx.providers),
                tensorrt_cache=config.onnx.tensorrt_cache,
            )
        },
    )


def _timeout_response() -> bytes:
    body = json.dumps(
        error_body(ErrorCode.BAD_REQUEST, "no complete request within the handshake timeout")
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def _head_timeout_protocol(
    timeout: float, on_timeout: Callable[[], None]
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline for each request head (see module doc)."""
    response = _timeout_response()

    class HeadTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:  # the next request on a keep-alive connection
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def handle_websocket_upgrade(self) -> None:
            super().handle_websocket_upgrade()
            # The transport now talks to the WebSocket protocol. This object is done, but
            # its parser holds its bound callbacks: a reference cycle that only the cyclic
            # collector (or, after a gc.freeze(), nothing) would free. Break it.
            self.parser = None  # type: ignore[assignment]

        def _arm(self) -> None:
            if timeout > 0:
                self._head_timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            on_timeout()
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(response)  # not in the middle of another response
            self.transport.close()

    return HeadTimeoutProtocol


class _LeanQueue:
    """The part of asyncio.Queue uvicorn's WebSocket protocol uses, for one connection.

    Why: an asyncio.Queue allocates three deques and an Event (about 3 KiB)
    up front; an idle session's queue is empty almost all its life. This one
    holds nothing while empty. Several waiting consumers are allowed, as with
    asyncio.Queue, although the ASGI app only ever has one.
    """

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque[ASGIReceiveEvent] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None

    def put_nowait(self, item: ASGIReceiveEvent) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
                    break

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    async def get(self) -> ASGIReceiveEvent:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
                if not self._waiters:
                    self._waiters = None
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item


class _LeanEvent:
    """The part of asyncio.Event uvicorn's protocol uses for ``writable``, without its deque.

    Why: asyncio.Event allocates a deque of waiters (about 850 bytes) that an
    idle connection, whose transport is always writable, never uses.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            self._waiters.remove(waiter)
            if not self._waiters:
                self._waiters = None


class _LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-io WebSocket protocol, trimmed for many idle sessions.

    Besides the lighter queue and event, it lets go of the handshake's request and
    response (headers and all, a few KiB) once the handshake is answered.
    uvicorn keeps both for the connection's lifetime but never reads them
    again, and the ``websockets`` parser keeps the request too, as a local
    of the generator that goes on to parse frames: that generator is
    replaced by a fresh frame parser. The swap is safe only while the
    parser holds no partial frame, i.e. when nothing arrived after the
    request (uvicorn hands over exactly the request head, and a client must
    wait for the 101 before sending frames); otherwise it is skipped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _LeanQueue()  # type: ignore[assignment]
        self.writable = _LeanEvent()  # type: ignore[assignment]
        self.writable.set()
        self._reads = 0

    def data_received(self, data: bytes) -> None:
        self._reads += 1
        super().data_received(data)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the upgrade was accepted: sessions may reset the connection
            scope["extensions"][CONNECTION_EXTENSION] = {"abort": self.transport.abort}

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if self.handshake_complete and getattr(self, "response", None) is not None:
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
            if message["type"] == "websocket.accept":
                self._restart_parser()

    def _restart_parser(self) -> None:
        conn = self.conn
        if self._reads != 1 or conn.state is not State.OPEN:
            return
        if not isinstance(getattr(conn, "reader", None), StreamReader) or conn.reader.buffer:
            return  # another websockets layout, or bytes already waiting: keep the parser
        conn.reader.buffer = bytearray()  # the request's bytes were read from it
        fresh = Protocol.parse(conn)  # the frame loop, without the handshake's locals
        next(fresh)  # runs to the first wait for data
        old, conn.parser = conn.parser, fresh
        old.close()


def _uvicorn_config(config: ServerConfig, gateway: GatewayApp) -> uvicorn.Config:
    timeouts = gateway.metrics.timeouts.labels("handshake")
    return uvicorn.Config(
        gateway.app,
        host=config.host,
        port=config.port,
        loop="none",
        http=_head_timeout_protocol(config.limits.handshake_timeout, timeouts.inc),
        ws=_LeanWebSocketProtocol,
        # Frames over the soft limit get a too_large error; far over it, 1009.
        ws_max_size=16 * config.limits.max_frame_bytes,
        ws_per_message_deflate=config.permessage_deflate,
        ws_ping_interval=config.limits.heartbeat_interval,
        ws_ping_timeout=config.limits.heartbeat_interval,
        lifespan="off",
        # After the drain (gateway.drain: generations finished or cancelled, sessions
        # closed), a connection that still has not closed is not waited for long.
        timeout_graceful_shutdown=5,
        log_config=None,
        access_log=False,
        server_header=False,
    )


@contextlib.asynccontextmanager
async def running_server(config: ServerConfig) -> AsyncIterator[RunningServer]:
    """Start engine and server in this loop (tests, embedded use); stop on exit."""
    _check_bind(config)
    auth = build_authenticator(config)
    async with EngineClient(_engine_config(config)) as engine:
        gateway = GatewayApp(config, engine, auth)
        for name in config.models:  # configured models stay loaded (keep_alive -1)
            await gateway.models.ensure(name, keep_alive=-1)
        server = _Server(_uvicorn_config(config, gateway), gateway, config.grace_period)
        # IPPROTO_TCP named explicitly: asyncio turns Nagle's algorithm off only on
        # sockets that say so (accepted ones inherit it). Left on, a reply written
        # in two parts (head, body) waits out the client's delayed ACK, 40 ms.
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        port = sock.getsockname()[1]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        watcher = asyncio.create_task(gateway.watch_revocations(), name="revocations")
        await gateway.bus.start()
        await gateway.nodes.start()
        await gateway.mirror.start(
            lambda: [s.resume_token for s in gateway.sessions if s.resume_token and not s.ended]
        )
        rpc = None
        if config.grpc.enabled:
            from gateway.grpcapi.server import GrpcServer  # grpcio only where it is on

            rpc = GrpcServer(gateway, config.host, config.grpc.port)
            await rpc.start()
        try:
            yield RunningServer(gateway, config.host, port, task, rpc.port if rpc else None)
        finally:
            watcher.cancel()
            if rpc is not None:
                await rpc.stop(config.grace_period)
            await server.shutdown_gracefully()
            await task
            sock.close()


CHAT_URL_FILE = "chat-url"


def _announce_chat_page(running: RunningServer, config: ServerConfig) -> None:
    """Tell the local user where the chat page is, with an admin token for it.

    The token is the local admin's, valid a week: it goes to a terminal, or
    when standard output is not one (a service log, a container's output) to
    ``FERROUS_HOME/chat-url`` with mode 0600, never into a log.
    """
    token = running.gateway.auth.issue_token(sub="local", ttl=7 * 24 * 3600, scopes=ALL_SCOPES)
    url = f"{running.http_url}/#token={token}"
    if sys.stdout.isatty():
        print(f"chat page: {url}", flush=True)
        return
    path = ferrous_home(config) / CHAT_URL_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(url + "\n")
    print(f"chat page: {running.http_url}/ (the link with its token is in {path})", flush=True)


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; the `ferrous serve` command."""
    configure_logging(config.log.level, config.log.format)
    raise_fd_limit()  # every session is a file descriptor
    tuner = GcTuner()
    try:
        async with running_server(config) as running:
            log.info("listening on %s (WebSocket %s)", running.http_url, running.ws_url)
            if running.grpc_port is not None:
                log.info("gRPC API on %s:%d", config.host, running.grpc_port)
            local = _is_loopback(config.host) and "HS256" in config.auth.algorithms
            if running.gateway.auth.enabled and local:
                _announce_chat_page(running, config)
            tuner.start()  # start-up objects leave the collector's working set
            running.gateway.gc_tuner = tuner
            await asyncio.shield(running.task)
    except ConfigError as exc:
        log.error("%s", exc.message)
        return 2
    finally:
        tuner.cancel()
    return 0
