"""Sessions outlive their node: two `ferrous serve` processes share a real redis-server; the
node running a session is killed (SIGKILL, workers and all) mid-generation, and the client's
resume on the other node gets what it missed, then the generation again after `restarted`,
while a generation it saw end is not run again. A node that is up keeps its sessions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from bench.nginx import nginx_binary, running_nginx
from gateway.mirror import MirroredSession, plan_takeover
from protocol import messages as m
from protocol.codec import codec_for
from protocol.errors import ErrorCode, ResumeExpired

from .gateway_helpers import free_port, serve_command
from .redisserver import redis_server

JSON = codec_for(m.SUBPROTOCOL_JSON)
LONG = m.Options(temperature=0.0, repeat_penalty=1.0, max_tokens=100_000)


# -- the decision, without processes ----------------------------------------------------


def _delta(gen: str, seq: int, n: int) -> m.Delta:
    return m.Delta(gen, seq, "x", n=n)


def _done(gen: str, n: int) -> m.Done:
    return m.Done(gen, "stop", m.Usage(1, 1), m.Timings(0, 0, 0, 0, 0), n=n)


def test_plan_takeover_replays_after_last_and_runs_again_only_what_did_not_end() -> None:
    run = m.Generate("g2", "tiny", "x")
    pull = m.Pull("p1", "tiny")
    mirrored = MirroredSession(
        "s-1",
        lost=2,
        last_n=9,
        messages=[_delta("g1", 0, 3), _done("g1", 4), _delta("g2", 0, 5), _delta("g2", 1, 6)],
        pending={"g1": m.Generate("g1", "tiny", "y"), "g2": run, "p1": pull},
    )
    plan = plan_takeover(mirrored, last=4)
    assert [x.n for x in plan.replay] == [5, 6]  # type: ignore[union-attr]
    assert plan.restart == [run]  # g1's end was written: it is not run again
    assert plan.failed == ["p1"]
    assert plan.last_n == 9
    assert plan_takeover(mirrored, last=12).last_n == 12  # the client saw more than was written
    with pytest.raises(ResumeExpired):
        plan_takeover(mirrored, last=1)  # n=2 is gone


# -- two nodes ----------------------------------------------------------------------------


class Node:
    def __init__(self, name: str, port: int, proc: subprocess.Popen[bytes], home: Path) -> None:
        self.name, self.port, self.proc, self.home = name, port, proc, home

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def kill(self) -> None:
        """SIGKILL to the node's process group: the gateway and its engine workers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _start_node(
    name: str, home: Path, secret: Path, redis_url: str, model: Path, **env: str
) -> Node:
    port = free_port()
    environ = {
        **os.environ,
        "FERROUS_HOME": str(home),
        "FERROUS_AUTH__SECRET_FILE": str(secret),
        "FERROUS_STATE__URL": redis_url,
        "FERROUS_STATE__NODE": name,
        "FERROUS_STATE__HEARTBEAT": "0.2",
        "FERROUS_STATE__DEAD_AFTER": "1.0",
        "FERROUS_LIMITS__RESUME_WINDOW": "30",
        **env,
    }
    proc = subprocess.Popen(
        serve_command(port, f"slow={model}"), env=environ, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Node(name, port, proc, home)
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"node {name} did not start")


@pytest.fixture
def nodes(tmp_path: Path, slow_model: Path) -> Iterator[tuple[Node, Node, str, str]]:
    secret = tmp_path / "secret"
    with redis_server(tmp_path / "redis") as (url, _):
        a = _start_node("a", tmp_path / "a", secret, url, slow_model)
        b = _start_node("b", tmp_path / "b", secret, url, slow_model)
        token = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "token", "--sub", "alice"],
            env={
                **os.environ,
                "FERROUS_HOME": str(tmp_path / "a"),
                "FERROUS_AUTH__SECRET_FILE": str(secret),
            },
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        try:
            yield a, b, token, url
        finally:
            for node in (a, b):
                if node.proc.poll() is None:
                    node.kill()


@contextlib.asynccontextmanager
async def _ws(node: Node, token: str) -> AsyncIterator[ClientConnection]:
    async with connect(
        node.url,
        subprotocols=[m.SUBPROTOCOL_JSON],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=None,
    ) as ws:
        yield ws


async def _recv(ws: ClientConnection) -> Any:
    return JSON.decode_server(await asyncio.wait_for(ws.recv(), 30))


async def test_a_killed_nodes_session_resumes_on_another_node(
    nodes: tuple[Node, Node, str, str],
) -> None:
    a, b, token, redis_url = nodes
    seen: list[Any] = []
    async with _ws(a, token) as ws:
        await ws.send(JSON.encode(m.Hello()))
        ready = await _recv(ws)
        assert isinstance(ready, m.Ready) and ready.resume_token
        # A generation that ends before the node dies is not run again.
        short = m.Options(temperature=0.0, repeat_penalty=1.0, max_tokens=3)
        await ws.send(JSON.encode(m.Generate("g0", "slow", "x", short)))
        while not isinstance(msg := await _recv(ws), m.Done):
            seen.append(msg)
        seen.append(msg)
        options = m.Options(temperature=0.0, repeat_penalty=1.0, max_tokens=48)
        turn = [m.ChatMessage("user", "hello there")]
        await ws.send(JSON.encode(m.Chat("g1", "slow", turn, "c1", options)))
        deltas = 0
        while deltas < 5:
            msg = await _recv(ws)
            seen.append(msg)
            deltas += isinstance(msg, m.Delta)
        a.kill()
    last = max(x.n for x in seen if getattr(x, "n", None))
    g1_text = "".join(x.text for x in seen if isinstance(x, m.Delta) and x.id == "g1")

    async with _ws(b, token) as ws:
        await ws.send(JSON.encode(m.Hello(resume=ready.resume_token, last=last)))
        resumed = await _recv(ws)
        assert isinstance(resumed, m.Ready) and resumed.resumed, resumed
        assert resumed.resume_token == ready.resume_token
        assert resumed.generations is not None and "g1" in resumed.generations
        after: list[Any] = []
        while not isinstance(msg := await _recv(ws), m.Done):
            after.append(msg)
        done = msg
    # What the dead node had sent after `last`, then `restarted`, then the run again.
    numbers = [x.n for x in [*after, done]]
    assert numbers == sorted(numbers) and numbers[0] > last
    i = next(k for k, x in enumerate(after) if isinstance(x, m.Restarted))
    replayed = after[:i]
    assert all(isinstance(x, m.Delta) and x.id == "g1" for x in replayed)
    assert [x.seq for x in replayed] == list(range(5, 5 + len(replayed)))
    assert after[i].id == "g1"
    started = [x for x in after[i + 1 :] if isinstance(x, m.Started)]
    assert len(started) == 1 and started[0].conversation == "c1"
    rerun = [x for x in after[i + 1 :] if isinstance(x, m.Delta)]
    assert [x.seq for x in rerun] == list(range(len(rerun)))
    assert done.id == "g1" and done.finish_reason == "length" and done.conversation == "c1"
    # Greedy: the run again says what the first run said, and g0 is not run again.
    again = "".join(x.text for x in rerun)
    assert again.startswith(g1_text + "".join(x.text for x in replayed))
    assert not any(getattr(x, "id", None) == "g0" for x in after)
    # The conversation holds the turn once, with the answer of the run that finished.
    from gateway.redisconversations import RedisConversations

    store = RedisConversations(redis_url, max_per_user=100)
    try:
        history = await store.history((None, "alice"), "c1", "slow")
    finally:
        await store.close()
    assert [(x.role, x.content) for x in history.messages] == [
        ("user", "hello there"),
        ("assistant", again),
    ]


def _restarted(messages: list[Any]) -> bool:
    return any(isinstance(x, m.Restarted) for x in messages)


async def test_a_node_that_is_up_keeps_its_sessions(
    nodes: tuple[Node, Node, str, str],
) -> None:
    a, b, token, _ = nodes
    async with _ws(a, token) as ws:
        await ws.send(JSON.encode(m.Hello()))
        ready = await _recv(ws)
        ws.transport.abort()  # dropped, not closed: the session waits for a resume
    async with _ws(b, token) as ws:
        await ws.send(JSON.encode(m.Hello(resume=ready.resume_token, last=0)))
        err = await _recv(ws)
        assert isinstance(err, m.Error) and err.code == ErrorCode.CONFLICT
        assert "node a" in err.message
        fresh = await _recv(ws)
        assert isinstance(fresh, m.Ready) and not fresh.resumed
    # The registry knows both nodes, alive (an admin's /readyz lists them).
    admin = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "token", "--sub", "ops", "--scope", "admin"],
        env={
            **os.environ,
            "FERROUS_HOME": str(a.home),
            "FERROUS_AUTH__SECRET_FILE": str(a.home.parent / "secret"),
        },
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    async with httpx.AsyncClient() as http:
        r = await http.get(
            f"http://127.0.0.1:{b.port}/readyz", headers={"Authorization": f"Bearer {admin}"}
        )
    body = r.json()
    assert r.status_code == 200 and body["node"] == "b"
    assert {(x["id"], x["alive"]) for x in body["nodes"]} == {("a", True), ("b", True)}
    # Still a's: resumed there.
    async with _ws(a, token) as ws:
        await ws.send(JSON.encode(m.Hello(resume=ready.resume_token, last=0)))
        again = await _recv(ws)
        assert isinstance(again, m.Ready) and again.resumed


# -- through the load balancer ---------------------------------------------------------------


@contextlib.contextmanager
def _nginx(folder: Path, upstreams: list[int]) -> Iterator[int]:
    """deploy/nginx.conf, as shipped, in front of ``upstreams``: its port."""
    if nginx_binary() is None:
        pytest.fail("nginx is not installed (Debian: apt-get install nginx-light)")
    with running_nginx(folder, upstreams) as port:
        yield port


async def test_through_nginx_the_sdk_resumes_on_the_other_node_when_its_node_dies(
    nodes: tuple[Node, Node, str, str], tmp_path: Path
) -> None:
    import hashlib

    import redis.asyncio as aioredis
    from ferrous_client import FerrousClient
    from ferrous_client.backoff import Backoff

    a, b, token, redis_url = nodes
    with _nginx(tmp_path / "nginx", [a.port, b.port]) as port:
        url = f"ws://127.0.0.1:{port}/v1/ws"
        backoff = Backoff(attempts=20, initial=0.1, maximum=0.5)
        async with FerrousClient(url, token=token, backoff=backoff) as c:
            # A conversation goes on through the balancer (the WebSocket upgrade passes).
            first = await c.chat(
                "slow", "hi", options={"temperature": 0, "max_tokens": 5}
            ).collect()
            assert first
            # Long enough that the node is killed mid-answer however slowly this
            # client reads (a loaded machine): its steps take a few milliseconds.
            gen = c.chat("slow", "hello there", options={"temperature": 0, "max_tokens": 600})
            parts: list[str] = []
            before = ""
            alive = None
            async for delta in gen:
                if delta.seq == 0:
                    parts.clear()
                parts.append(delta.text)
                if len(parts) == 5 and alive is None:
                    before = "".join(parts)
                    # Kill the node holding the session, as the shared store says.
                    assert c.ready is not None and c.ready.resume_token
                    digest = hashlib.sha256(c.ready.resume_token.encode()).hexdigest()[:32]
                    store = aioredis.from_url(redis_url, decode_responses=True)
                    try:
                        holder = await store.hget(f"ferrous:s:{{{digest}}}", "node")
                    finally:
                        await store.aclose()
                    dead, alive = (a, b) if holder == "a" else (b, a)
                    dead.kill()
            assert gen.restarted is not None and gen.restarted.id == gen.id
            assert gen.done is not None and gen.done.finish_reason == "length"
            assert c.resumes >= 1
            assert "".join(parts).startswith(before)
            # The other node answers from here on.
            assert alive is not None and alive.proc.poll() is None
            again = await c.chat(
                "slow", "hi", options={"temperature": 0, "max_tokens": 5}
            ).collect()
            assert again == first


# -- the store going away ------------------------------------------------------------------


async def test_writes_made_while_the_store_is_away_land_in_order_once_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-server stopped (SIGSTOP) under a node's session: sessions are not held up,
    what they sent is written once the server answers again, in order, and another node
    takes the session over with nothing missing; past what a session may keep queued,
    the copy is given up and a takeover is refused rather than resumed with a gap."""
    from gateway import redissessions
    from gateway.nodes import LocalNodes
    from gateway.redissessions import RedisSessions

    encoder = msgspec.msgpack.Encoder()
    owner = (None, "alice")
    with redis_server(tmp_path / "redis") as (url, proc):
        a = RedisSessions(url, LocalNodes("a"), window=30)
        b = RedisSessions(url, LocalNodes("b"), window=30)
        await a.start(list)
        try:
            for token in ("kept", "dropped"):
                a.opened(token, "s-1", owner)
            for n in (1, 2, 3):
                a.sent("kept", n, encoder.encode(m.Delta("g1", n - 1, "x", n=n)))
            await a.sync()
            monkeypatch.setattr(redissessions, "MAX_RETAINED", 3 * 20)
            proc.send_signal(signal.SIGSTOP)
            try:
                for n in (4, 5, 6):
                    a.sent("kept", n, encoder.encode(m.Delta("g1", n - 1, "x", n=n)))
                for n in range(1, 40):
                    a.sent("dropped", n, encoder.encode(m.Delta("g1", n - 1, "x", n=n)))
                async with asyncio.timeout(30):
                    while a.healthy:
                        await asyncio.sleep(0.1)
                t0 = time.monotonic()
                await a.sync()  # returns at once while the store is away
                assert time.monotonic() - t0 < 0.5
            finally:
                proc.send_signal(signal.SIGCONT)
            async with asyncio.timeout(30):
                while not a.healthy or a._queued:
                    await asyncio.sleep(0.1)
            taken = await b.take("kept", owner, 0)
            assert [x.n for x in taken.messages] == [1, 2, 3, 4, 5, 6]
            assert taken.lost == 0
            with pytest.raises(ResumeExpired):
                plan_takeover(await b.take("dropped", owner, 0), 0)
        finally:
            await a.close()
            await b.close()
