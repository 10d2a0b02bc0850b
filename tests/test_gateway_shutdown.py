"""`ferrous serve` as a process: SIGTERM drains in-flight generations, closes 1001, exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from protocol import messages as m
from protocol.codec import codec_for

from .gateway_helpers import free_port, serve_command

JSON = codec_for(m.SUBPROTOCOL_JSON)


async def _start(home: Path, port: int, model: Path, grace: float) -> asyncio.subprocess.Process:
    env = {**os.environ, "FERROUS_HOME": str(home), "FERROUS_GRACE_PERIOD": str(grace)}
    proc = await asyncio.create_subprocess_exec(*serve_command(port, f"slow={model}"), env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


async def _token(home: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "token",
        "--sub",
        "ops",
        env={**os.environ, "FERROUS_HOME": str(home)},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    return out.decode().strip()


@pytest.mark.parametrize(
    ("grace", "max_tokens", "expect"), [(10.0, 40, "length"), (0.3, 100_000, "cancelled")]
)
async def test_sigterm_drains_then_closes_going_away(
    tmp_path: Path, slow_model: Path, grace: float, max_tokens: int, expect: str
) -> None:
    port = free_port()
    proc = await _start(tmp_path, port, slow_model, grace)
    try:
        token = await _token(tmp_path)
        async with connect(
            f"ws://127.0.0.1:{port}/v1/ws",
            subprotocols=[m.SUBPROTOCOL_JSON],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {token}"},
        ) as ws:
            await ws.send(JSON.encode(m.Hello()))
            await ws.recv()
            options = m.Options(temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens)
            await ws.send(JSON.encode(m.Generate("g", "slow", "x", options)))
            while not isinstance(JSON.decode_server(await ws.recv()), m.Delta):
                pass
            proc.send_signal(signal.SIGTERM)
            done = None
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    msg = JSON.decode_server(await ws.recv())
                    if isinstance(msg, m.Done):
                        done = msg
            assert done is not None and done.finish_reason == expect
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
