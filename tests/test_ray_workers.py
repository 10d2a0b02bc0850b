"""Engine workers on another node of a Ray cluster: a real two-node cluster on loopback (Ray's
own head and a second raylet offering the resource the workers ask for), a real server whose
worker is placed there, tokens streamed back over the worker's own connection; the worker
killed mid-generation gives a typed, retryable error, a replacement is placed, and later
requests succeed. The ring over the connection is checked on its own too."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import ipc, remote
from engine.netring import NetRing, NetRingWriter
from engine.rings import RingFull, record_size
from gateway.config import RayConfig
from gateway.server import RunningServer

from .gateway_helpers import gateway, server_config

SCRIPT = "Hi ö你🙂!"


def test_a_ring_over_the_connection_holds_at_most_its_capacity_unconfirmed() -> None:
    sent: list[ipc.FromWorker] = []
    writer = NetRingWriter(sent.append, 7, capacity=256)
    reader = NetRing(256)
    record = record_size(b"x" * 40, 2)
    written = 0
    with pytest.raises(RingFull):
        while True:
            writer.write([1, 2], b"x" * 40)
            written += record
    assert written <= 256 < written + record  # paused with the window full
    for frame in sent:
        assert isinstance(frame, ipc.Text) and frame.gen == 7
        reader.feed(frame.ids, frame.text, frame.extra)
    records, confirm = reader.read()
    assert len(records) == len(sent) and records[0] == ([1, 2], b"x" * 40, b"")
    assert confirm and reader.tail == written  # a quarter or more was read: confirm it
    writer.confirmed(reader.tail)
    assert writer.used() == 0
    writer.write([3], b"y")  # room again
    assert reader.read() == ([], False)


@pytest.fixture
def cluster() -> Iterator[Any]:
    """Ray's head (no room for workers) and a second node offering ``far``."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    c: Any = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 1},
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
        },
    )
    far = c.add_node(num_cpus=2, resources={"far": 2}, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    try:
        yield c, far
    finally:
        c.shutdown()


@pytest.fixture
async def server(cluster: Any, tmp_path: Path, script_model: Path) -> AsyncIterator[RunningServer]:
    c, _ = cluster
    ray = RayConfig(enabled=True, address=c.address, resources={"far": 1})
    # The smallest ring: long answers pass its window many times over.
    config = server_config(tmp_path, {"script": script_model}, ray=ray, ring_capacity=4096)
    async with gateway(config) as running:
        yield running


async def _generate(srv: RunningServer, max_tokens: int) -> httpx.Response:
    token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=60) as c:
        return await c.post(
            "/v1/generate",
            json={
                "model": "script",
                "prompt": "x",
                "options": {"temperature": 0, "max_tokens": max_tokens},
            },
            headers={"Authorization": f"Bearer {token}"},
        )


def _far_node_id() -> str:
    import ray

    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return str(next(n["NodeID"] for n in nodes if n["Alive"] and "far" in n["Resources"]))


async def test_workers_on_another_ray_node(server: RunningServer) -> None:
    """One cluster, one server (a cluster costs a dozen processes): the worker placed on
    the far node streams through its connection, the worker port turns strangers away,
    and a killed worker fails its generation and is replaced there."""
    await _placed(server)
    await _strangers(server)
    await _killed(server)


async def _placed(server: RunningServer) -> None:
    r = await _generate(server, 26)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == SCRIPT * 2
    health = await server.gateway.engine.health()
    assert health.ok and [w.where for w in health.workers] == [f"ray:{_far_node_id()}"]
    # Long answers pass the ring's window many times over (flow control confirms as it reads).
    r = await _generate(server, 1500)
    assert r.status_code == 200, r.text
    text = r.json()["text"].rstrip("\ufffd")  # the last token may end inside a character
    assert len(text) > 500 and (SCRIPT * 1000).startswith(text)
    assert r.json()["usage"]["completion_tokens"] == 1500


async def _strangers(server: RunningServer) -> None:
    """The worker port takes only the connections of the workers it started: a Hello
    with another nonce (or none, or garbage) is closed unread."""
    port = server.gateway.engine.worker_port
    assert port is not None
    for first in (
        ipc.encode(ipc.Hello(pid=1, backends=[], nonce="guessed")),
        ipc.encode(ipc.Hello(pid=1, backends=[])),
        b"\x05\x00\x00\x00garbage",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first)
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed, nothing sent
        writer.close()
    # One that says nothing is closed after the handshake timeout (lowered here).
    remote.HANDSHAKE_TIMEOUT = 0.5
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
    finally:
        remote.HANDSHAKE_TIMEOUT = 10.0
    r = await _generate(server, 13)  # the real worker is untouched
    assert r.status_code == 200 and r.json()["text"] == SCRIPT


async def _killed(server: RunningServer) -> None:
    token = server.gateway.auth.issue_token(sub="alice", ttl=600)
    [worker] = (await server.gateway.engine.health()).workers
    pid = worker.pid  # the actor's process (on this machine here; elsewhere in a deployment)
    assert server.gateway.engine.worker_pids() == {}  # no local process to read metrics of
    async with (
        httpx.AsyncClient(base_url=server.http_url, timeout=60) as c,
        c.stream(
            "POST",
            "/v1/generate",
            json={
                "model": "script",
                "prompt": "x",
                "stream": True,
                "options": {"temperature": 0, "max_tokens": 100_000},
            },
            headers={"Authorization": f"Bearer {token}"},
        ) as stream,
    ):
        lines = stream.aiter_lines()
        async for line in lines:
            if '"text"' in line:
                break
        os.kill(pid, signal.SIGKILL)  # the actor's process, on the far node
        tail = [line async for line in lines if line.strip()]
    error = next(line for line in tail if '"type":"error"' in line)
    assert '"code":"engine_error"' in error and '"retryable":true' in error and "died" in error
    assert '"finish_reason":"error"' in tail[-1]
    # A replacement is placed on the far node again, and serves.
    async with asyncio.timeout(60):
        while True:
            workers = (await server.gateway.engine.health()).workers
            if workers[0].alive and workers[0].pid != pid:
                break
            await asyncio.sleep(0.2)
    r = await _generate(server, 13)
    assert r.status_code == 200 and r.json()["text"] == SCRIPT
    health = await server.gateway.engine.health()
    assert health.restarts >= 1 and health.workers[0].where == f"ray:{_far_node_id()}"
    async with httpx.AsyncClient(base_url=server.http_url) as c:
        metrics = (await c.get("/metrics")).text
    assert f'ferrous_worker_up{{where="ray:{_far_node_id()}",worker="0"}} 1.0' in metrics
