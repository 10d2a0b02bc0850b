"""Running the gateway: engine, authenticator and one uvicorn server on one port.

uvicorn serves HTTP with httptools and WebSocket with the ``websockets``
package's protocol core (``ws="websockets-sansio"``), on the running uvloop
loop. Shutdown (SIGTERM or SIGINT) runs in a fixed order: stop listening,
refuse new generations, let in-flight ones finish for ``grace_period``
seconds, cancel the rest, close every WebSocket with 1001, stop the workers,
exit 0. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import FrameType

import uvicorn

from engine import EngineClient, EngineConfig
from engine.backends.base import OnnxOptions
from engine.client import default_threads, default_workers
from gateway.app import Gateway
from gateway.auth import Authenticator
from gateway.config import ConfigError, ServerConfig, ferrous_home, parse_size
from gateway.logs import configure_logging
from protocol.durations import parse_duration

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

    def __init__(self, config: uvicorn.Config, gateway: Gateway, grace: float) -> None:
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
    gateway: Gateway
    host: str
    port: int
    task: asyncio.Task[None]  # ends when the server has stopped

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
    return EngineConfig(
        workers=config.workers or default_workers(),
        threads_per_worker=config.threads_per_worker or default_threads(),
        seqs_per_worker=config.seqs_per_worker,
        ring_capacity=config.ring_capacity,
        stall_timeout=config.stall_timeout,
        memory_budget=parse_size(config.memory_budget),
        keep_alive=parse_duration(config.keep_alive),
        onnx=OnnxOptions(
            spinning=config.onnx.spinning,
            graph_optimization=config.onnx.graph_optimization,
            memory_arena=config.onnx.memory_arena,
        ),
    )


def _uvicorn_config(config: ServerConfig, gateway: Gateway) -> uvicorn.Config:
    return uvicorn.Config(
        gateway.app,
        host=config.host,
        port=config.port,
        loop="none",
        http="httptools",
        ws="websockets-sansio",
        # Frames over the soft limit get a too_large error; far over it, 1009.
        ws_max_size=16 * config.limits.max_frame_bytes,
        ws_per_message_deflate=config.permessage_deflate,
        ws_ping_interval=config.limits.heartbeat_interval,
        ws_ping_timeout=config.limits.heartbeat_interval,
        lifespan="off",
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
        gateway = Gateway(config, engine, auth)
        for name in config.models:  # configured models stay loaded (keep_alive -1)
            await gateway.models.ensure(name, keep_alive=-1)
        server = _Server(_uvicorn_config(config, gateway), gateway, config.grace_period)
        sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        port = sock.getsockname()[1]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        try:
            yield RunningServer(gateway, config.host, port, task)
        finally:
            await server.shutdown_gracefully()
            await task
            sock.close()


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; the `ferrous serve` command."""
    configure_logging(config.log.level, config.log.format)
    try:
        async with running_server(config) as running:
            gc.collect()
            gc.freeze()  # start-up objects leave the collector's working set
            log.info("listening on %s (WebSocket %s)", running.http_url, running.ws_url)
            local = _is_loopback(config.host) and "HS256" in config.auth.algorithms
            if running.gateway.auth.enabled and local:
                token = running.gateway.auth.issue_token(sub="local", ttl=7 * 24 * 3600)
                print(f"chat page: {running.http_url}/#token={token}", flush=True)
            await asyncio.shield(running.task)
    except ConfigError as exc:
        log.error("%s", exc.message)
        return 2
    return 0
