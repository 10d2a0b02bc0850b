"""Slow and hostile WebSocket clients: timeouts, admission limits, and clients that never read.

Every test runs a real gateway on a loopback port. Raw sockets play the
clients a well-behaved library would never be: half a request line, an
upgrade and then silence, a session that never reads what it asked for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from gateway.config import LimitsConfig
from gateway.limits import AdmissionControl, Lease, Refusal, TokenBuckets
from gateway.process_tuning import GC_THRESHOLDS, GcTuner, raise_fd_limit
from gateway.server import RunningServer
from protocol import messages as m

from .gateway_helpers import JSON, client, gateway, server_config


@contextlib.asynccontextmanager
async def _gateway(
    tmp_path: Path, script_model: Path, **limits: object
) -> AsyncIterator[RunningServer]:
    # Dropped sessions are kept for a resume: briefly here, so tests see them released.
    limits.setdefault("resume_window", 0.2)
    config = server_config(tmp_path, {"script": script_model}, limits=LimitsConfig(**limits))  # type: ignore[arg-type]
    async with gateway(config) as running:
        yield running


def _token(running: RunningServer, user: str = "alice") -> str:
    return running.gateway.auth.issue_token(sub=user, ttl=600)


async def _refused(running: RunningServer, token: str | None) -> InvalidStatus:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(InvalidStatus) as info:
        async with connect(
            running.ws_url,
            subprotocols=[Subprotocol(m.SUBPROTOCOL_JSON)],
            additional_headers=headers,
        ):
            pass
    return info.value


def _assert_429(exc: InvalidStatus, words: str) -> None:
    response = exc.response
    assert response.status_code == 429
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Retry-After"]) >= 1
    body = json.loads(response.body or b"")
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["retryable"] is True
    assert words in body["error"]["message"]


async def _idle(running: RunningServer) -> None:
    """Wait until no generation runs (a dropped client's is cancelled asynchronously)."""
    deadline = time.monotonic() + 5
    while running.gateway.running:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def _released(running: RunningServer) -> None:
    """Wait until the server has let go of every connection's counts (closes are async)."""
    deadline = time.monotonic() + 5
    while running.gateway.admission.tracked != (0, 0) or running.gateway.sessions:
        assert time.monotonic() < deadline, running.gateway.admission.tracked
        await asyncio.sleep(0.02)


# -- raw WebSocket clients -------------------------------------------------------------------


def _frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (RFC 6455 5.2); the mask key is zero, which is allowed."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def _json(msg: m.ClientMessage) -> bytes:
    data = JSON.encode(msg)
    return data.encode() if isinstance(data, str) else data


def _upgrade_request(running: RunningServer, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /v1/ws HTTP/1.1\r\nHost: {running.host}:{running.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {m.SUBPROTOCOL_JSON}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


def _raw_session(running: RunningServer, token: str, rcvbuf: int = 4096) -> socket.socket:
    """Upgrade, say hello, and return the socket (blocking I/O: call in a thread).

    A small receive buffer (set before connecting, so the kernel does not
    auto-tune it) makes the server's writes back up after a few KiB.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((running.host, running.port))
    sock.sendall(_upgrade_request(running, token))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing after the head may be consumed here
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(_frame(_json(m.Hello(client="never-reads"))))
    sock.setblocking(False)
    return sock


def _flood(sock: socket.socket, data: bytes) -> int:
    """Send what the kernel takes right now; the rest is dropped (the client never waits)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


async def _wait_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


# -- timeouts ---------------------------------------------------------------------------------


async def test_a_stalled_request_head_is_timed_out_and_closed(
    tmp_path: Path, script_model: Path
) -> None:
    async with _gateway(tmp_path, script_model, handshake_timeout=0.5) as running:
        reader, writer = await asyncio.open_connection(running.host, running.port)
        writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webs")  # then nothing
        t0 = time.monotonic()
        data = await _wait_closed(reader, timeout=15)
        elapsed = time.monotonic() - t0
        writer.close()
        assert 0.4 <= elapsed < 12, elapsed  # not before the 0.5 s timeout; closed at all
        assert data.startswith(b"HTTP/1.1 408 "), data
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "bad_request"

        # A connection that sends nothing at all is closed too.
        reader, writer = await asyncio.open_connection(running.host, running.port)
        await _wait_closed(reader, timeout=15)
        writer.close()
        metrics = running.gateway.metrics.render().decode()
        assert 'ferrous_connection_timeouts_total{phase="handshake"} 2.0' in metrics

        # A complete request in time is served, and keep-alive requests get the same deadline.
        reader, writer = await asyncio.open_connection(running.host, running.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")
        t0 = time.monotonic()
        data = await _wait_closed(reader, timeout=15)
        writer.close()
        assert b"HTTP/1.1 408 " in data
        assert time.monotonic() - t0 < 12


async def test_a_session_without_hello_is_closed(tmp_path: Path, script_model: Path) -> None:
    async with _gateway(tmp_path, script_model, hello_timeout=0.5) as running:
        token = _token(running)
        async with client(running, token, hello=False) as c:
            t0 = time.monotonic()
            error = await asyncio.wait_for(c.recv(), 15)
            assert isinstance(error, m.Error)
            assert error.code.value == "bad_request"
            assert error.message == "no hello within 0.5 s"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(c.recv(), 15)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == "hello timeout"
            assert 0.4 <= time.monotonic() - t0 < 12

        # A session that said hello in time is not touched by the timer.
        async with client(running, token) as c:
            await asyncio.sleep(1.0)
            await c.send(m.Heartbeat())
            assert isinstance(await asyncio.wait_for(c.recv(), 5), m.ServerHeartbeat)
        await _released(running)


# -- admission limits -------------------------------------------------------------------------


async def test_connections_per_address_are_limited_and_released(
    tmp_path: Path, script_model: Path
) -> None:
    async with _gateway(tmp_path, script_model, max_connections_per_ip=3) as running:
        token = _token(running)
        for _ in range(2):  # open N, refuse one more, close, open N again
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(3):
                    await stack.enter_async_context(client(running, token))
                assert running.gateway.admission.connections_from("127.0.0.1") == 3
                _assert_429(await _refused(running, token), "at most 3 connections from one")
            await _released(running)


async def test_connections_per_user_are_limited(tmp_path: Path, script_model: Path) -> None:
    async with _gateway(tmp_path, script_model, max_connections_per_user=2) as running:
        alice, bob = _token(running, "alice"), _token(running, "bob")
        async with client(running, alice), client(running, alice):
            _assert_429(await _refused(running, alice), "at most 2 connections per user")
            async with client(running, bob) as c:  # another user is not affected
                await c.send(m.Heartbeat())
                assert isinstance(await c.recv(), m.ServerHeartbeat)
        await _released(running)
        async with client(running, alice), client(running, alice):
            pass
        await _released(running)


async def test_the_handshake_rate_is_limited_per_address_and_recovers(
    tmp_path: Path, script_model: Path
) -> None:
    async with _gateway(tmp_path, script_model, handshake_rate=4.0, handshake_burst=3) as running:
        token = _token(running)
        for _ in range(3):
            async with client(running, token, hello=False):
                pass
        refused = await _refused(running, token)
        _assert_429(refused, "too many handshakes")
        assert refused.response.headers["Retry-After"] == "1"
        await asyncio.sleep(0.3)  # one token comes back every 0.25 s
        async with client(running, token):
            pass
        await _released(running)


async def test_every_close_path_gives_back_its_counts(tmp_path: Path, script_model: Path) -> None:
    limits: dict[str, Any] = {
        "max_connections_per_ip": 50,
        "max_connections_per_user": 50,
        "hello_timeout": 0.3,
    }
    async with _gateway(tmp_path, script_model, **limits) as running:
        token = _token(running)
        # Refused at authentication (after the address slot was taken).
        exc = await _refused(running, None)
        assert exc.response.status_code == 401
        # Refused for an unknown subprotocol.
        with pytest.raises(InvalidStatus):
            async with connect(running.ws_url, subprotocols=["nope"]):  # type: ignore[list-item]
                pass
        # Closed by the server for not saying hello.
        async with client(running, token, hello=False) as c:
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(c.recv(), 5)
        # Closed by the client, normally and in the middle of a generation.
        async with client(running, token) as c:
            await c.send(m.Generate("g", "script", "x", m.Options(max_tokens=100_000)))
            await c.recv()
        # Dropped without a close frame (TCP reset).
        sock = await asyncio.to_thread(_raw_session, running, token)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await _released(running)
        # Closed by the server shutting down: see test_gateway_shutdown; the finally is the same.


def _open_and_close(running: RunningServer, token: str) -> None:
    """A whole session over a raw socket: upgrade, hello, ready, close 1000, server's close."""
    sock = _raw_session(running, token)
    sock.setblocking(True)
    assert sock.recv(65536)  # ready
    sock.sendall(_frame(struct.pack("!H", 1000), opcode=0x8))
    while sock.recv(65536):
        pass
    sock.close()


def _generate_and_drop(running: RunningServer, token: str) -> None:
    """A session whose client vanishes (no close frame) while its generation streams."""
    sock = _raw_session(running, token)
    sock.setblocking(True)
    assert sock.recv(65536)  # ready
    options = m.Options(max_tokens=2000, ignore_eos=True)
    sock.sendall(_frame(_json(m.Generate("g", "script", "hi", options))))
    assert sock.recv(65536)  # started / the first deltas
    sock.close()


@pytest.mark.parametrize("session", [_open_and_close, _generate_and_drop])
async def test_a_closed_session_leaves_no_reference_cycles(
    tmp_path: Path, script_model: Path, session: Callable[[RunningServer, str], None]
) -> None:
    """The GC freezes of ``ferrous serve`` rely on closed sessions being freed by refcounting.

    (A frozen object in a cycle is not collected until the next sweep: see
    gateway.process_tuning.) The clients are raw sockets. The test loop is asyncio's
    own, whose selector transports do form a cycle per connection; uvloop's,
    which ``ferrous serve`` runs, do not. So the check is that no object of
    the server's stack (gateway, uvicorn, Starlette, websockets, httptools)
    is among the garbage.
    """
    async with _gateway(tmp_path, script_model) as running:
        token = _token(running)
        await asyncio.to_thread(session, running, token)  # warm every code path up
        await _released(running)
        await _idle(running)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                await asyncio.to_thread(session, running, token)
                await _released(running)
                await _idle(running)
            await _released(running)
            await asyncio.sleep(0.1)
            gc.collect()
            ours = sorted(
                {
                    f"{type(o).__module__}.{type(o).__qualname__}"
                    for o in gc.garbage
                    if type(o).__module__.split(".")[0] in _SERVER_STACK
                }
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert ours == [], ours


_SERVER_STACK = {"gateway", "uvicorn", "starlette", "websockets", "httptools", "protocol", "engine"}


# -- clients that never read ------------------------------------------------------------------


async def test_clients_that_never_read_are_bounded_and_do_not_stop_others(
    tmp_path: Path, script_model: Path
) -> None:
    """200 sessions ask for replies and never read them; a normal client streams meanwhile.

    Bound: the server stops reading a session whose replies it cannot write
    (uvicorn pauses the transport at 64 KiB of unsent data, and the session
    waits for it before reading the next message), so each costs at most
    about 64 KiB of buffer plus the session's objects. The test asserts a
    generous 512 KiB per connection of process RSS growth (client side
    included: its unsent data stays in the kernel, not in this process).
    """
    n = 200
    async with _gateway(tmp_path, script_model) as running:
        token = _token(running)
        proc = psutil.Process()
        gc.collect()
        before = proc.memory_info().rss
        socks = await asyncio.gather(
            *(asyncio.to_thread(_raw_session, running, token) for _ in range(n))
        )
        try:
            flood = _frame(_json(m.Heartbeat())) * 200
            sent = [_flood(s, flood) for s in socks]
            assert sum(sent) > 0
            async with client(running, token) as c:
                await c.send(m.Generate("g", "script", "Hi", m.Options(max_tokens=200)))
                _, done, _ = await asyncio.wait_for(c.until_done("g"), 60)
                assert done.finish_reason == "length"
                assert done.usage.completion_tokens == 200
            for _ in range(3):  # more floods: the server must have stopped reading
                await asyncio.sleep(0.2)
                sent = [_flood(s, flood) for s in socks]
            assert len(running.gateway.sessions) == n
            growth = proc.memory_info().rss - before
            assert growth < n * 512 * 1024, f"{growth / n / 1024:.0f} KiB per connection"
        finally:
            for s in socks:
                s.close()
        await _released(running)


async def test_a_hostile_client_does_not_block_a_streaming_one(
    tmp_path: Path, script_model: Path
) -> None:
    """Slowloris connections in their dozens do not delay a session that streams."""
    async with _gateway(tmp_path, script_model, handshake_timeout=2.0) as running:
        token = _token(running)
        stalled = [await asyncio.open_connection(running.host, running.port) for _ in range(100)]
        for _, writer in stalled:
            writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        async with client(running, token) as c:
            await c.send(m.Generate("g", "script", "Hi", m.Options(max_tokens=50)))
            _, done, _ = await asyncio.wait_for(c.until_done("g"), 30)
            assert done.usage.completion_tokens == 50
        closed = await asyncio.gather(*(_wait_closed(r, timeout=10) for r, _ in stalled))
        assert all(data.startswith(b"HTTP/1.1 408 ") for data in closed)
        for _, writer in stalled:
            writer.close()


# -- the pieces on their own ------------------------------------------------------------------


def test_token_buckets_refill_at_the_rate_and_forget_quiet_addresses() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert buckets.take("b") == 0.0  # per key
    now[0] = 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    # A flood of distinct addresses: entries that are full again are dropped.
    for i in range(5000):
        buckets.take(f"10.0.{i // 256}.{i % 256}")
    now[0] = 10.0
    for i in range(5000):
        buckets.take(f"10.1.{i // 256}.{i % 256}")
    assert len(buckets) <= 5000 + 2
    assert TokenBuckets(rate=0.0, burst=1).take("a") == 0.0  # 0 = unlimited


def test_leases_release_once() -> None:
    control = AdmissionControl(per_ip=1, per_user=1)
    lease = control.admit("1.2.3.4")
    assert isinstance(lease, Lease)
    assert isinstance(control.admit("1.2.3.4"), Refusal)
    assert control.admit_user(lease, "t/alice") is None
    lease.release()
    lease.release()  # a second release must not free someone else's slot
    assert control.tracked == (0, 0)
    again = control.admit("1.2.3.4")
    assert isinstance(again, Lease)
    assert control.admit_user(again, "t/alice") is None
    again.release()


async def test_the_gc_tuner_freezes_after_accepts_and_sweeps_after_closes() -> None:
    thresholds = gc.get_threshold()
    tuner = GcTuner(freeze_every=3, delay=0.01)
    try:
        tuner.start()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert (tuner.freezes, tuner.sweeps) == (1, 0)
        for _ in range(3):
            tuner.note_accept()
        await asyncio.sleep(0.1)
        assert (tuner.freezes, tuner.sweeps) == (2, 0)
        assert gc.get_freeze_count() > 0
        for _ in range(3):
            tuner.note_close()
        await asyncio.sleep(0.1)
        assert (tuner.freezes, tuner.sweeps) == (3, 1)
    finally:
        tuner.cancel()
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_the_open_file_limit_is_raised_to_the_hard_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit is too low to lower the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with caplog.at_level(logging.INFO, logger="ferrous.server"):
            old, new = raise_fd_limit()
        assert old == 256
        assert new == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 256
        assert f"raised open-file limit from 256 to {new}" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
