"""Helpers for gateway tests: a real server on a loopback port, a real websockets client."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from gateway.config import LimitsConfig, ModelEntry, ServerConfig
from gateway.server import RunningServer, running_server
from protocol import messages as m
from protocol.codec import Codec, codec_for

JSON = codec_for(m.SUBPROTOCOL_JSON)
MSGPACK = codec_for(m.SUBPROTOCOL_MSGPACK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(port: int, model: str, *, auth: bool = True) -> list[str]:
    """``ferrous serve`` on ``port`` with one single-threaded worker; ``model`` is ``name=path``."""
    return [
        *(sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)),
        *("--workers", "1", "--threads", "1", "--model", model, "--log-level", "warning"),
        *(() if auth else ("--no-auth",)),
    ]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Terminate ``proc``; kill it when it is not gone within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def server_config(home: Path, models: dict[str, Path], **changes: Any) -> ServerConfig:
    limits = changes.pop("limits", None) or LimitsConfig()
    return ServerConfig(
        home=str(home),
        port=0,
        workers=1,
        threads_per_worker=1,
        models={name: ModelEntry(path=str(p)) for name, p in models.items()},
        limits=limits,
        grace_period=changes.pop("grace_period", 2.0),
        **changes,
    )


@contextlib.asynccontextmanager
async def gateway(config: ServerConfig) -> AsyncIterator[RunningServer]:
    async with running_server(config) as running:
        yield running


class Client:
    """A protocol client over a real websockets connection (test-side, deliberately plain)."""

    def __init__(self, ws: ClientConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec

    async def send(self, msg: m.ClientMessage) -> None:
        await self.ws.send(self.codec.encode(msg))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self) -> m.ServerMessage:
        return self.codec.decode_server(await self.ws.recv())

    async def hello(self, **kw: Any) -> m.Ready:
        await self.send(m.Hello(**kw))
        ready = await self.recv()
        assert isinstance(ready, m.Ready), ready
        return ready

    async def until_done(self, gen_id: str) -> tuple[list[m.Delta], m.Done, list[m.ServerMessage]]:
        """Messages of one generation until its done; other messages are returned too."""
        deltas: list[m.Delta] = []
        other: list[m.ServerMessage] = []
        while True:
            msg = await self.recv()
            if isinstance(msg, m.Delta) and msg.id == gen_id:
                deltas.append(msg)
            elif isinstance(msg, m.Done) and msg.id == gen_id:
                return deltas, msg, other
            else:
                other.append(msg)


@contextlib.asynccontextmanager
async def client(
    running: RunningServer,
    token: str | None,
    *,
    subprotocol: str = m.SUBPROTOCOL_JSON,
    hello: bool = True,
    **kw: Any,
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with connect(
        running.ws_url,
        subprotocols=[subprotocol],
        additional_headers=headers,
        **kw,  # type: ignore[list-item]
    ) as ws:
        c = Client(ws, codec_for(subprotocol))
        if hello:
            await c.hello()
        yield c
