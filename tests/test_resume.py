"""Session resume end to end: a real server, real sockets cut by a relay, the real SDK.

The relay (:mod:`tests.tcp_proxy`) aborts connections at random byte counts,
in either direction, mid-frame when the count lands there; the client sees
what a phone sees when its network drops.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ferrous_client import FerrousClient, ResumeExpired, SyncFerrousClient

from gateway.config import AuthConfig, LimitsConfig
from gateway.server import RunningServer
from protocol import messages as m
from protocol.errors import ErrorCode

from .conftest import SCRIPT
from .gateway_helpers import client, gateway, server_config
from .tcp_proxy import Relay

GREEDY = m.Options(temperature=0.0, repeat_penalty=1.0)


@pytest.fixture
async def server(
    tmp_path: Path, random_model: Path, slow_model: Path, script_model: Path
) -> AsyncIterator[RunningServer]:
    limits = LimitsConfig(max_frame_bytes=8192, resume_buffer_bytes=4096)
    config = server_config(
        tmp_path,
        {"random": random_model, "slow": slow_model, "script": script_model},
        limits=limits,
        auth=AuthConfig(leeway=0.5),
        ring_capacity=4096,  # with the 4 KiB replay budget: a detached generation soon waits
    )
    async with gateway(config) as running:
        yield running


@pytest.fixture
def token(server: RunningServer) -> str:
    return server.gateway.auth.issue_token(sub="alice", ttl=600)


def sampled(seed: int) -> dict[str, object]:
    return {"temperature": 1.0, "seed": seed, "max_tokens": 40}


async def test_random_disconnects_lose_and_repeat_nothing(
    server: RunningServer, token: str
) -> None:
    """100 generations, each with its connection cut at a random byte in a random
    direction: every text equals the uninterrupted run with the same seed."""
    rng = random.Random(20261204)
    seeds = list(range(100))
    expected: dict[int, tuple[str, str | None]] = {}
    async with FerrousClient(server.ws_url, token=token, resume=False) as direct:
        for seed in seeds:
            ref = direct.generate("random", "x", options=sampled(seed))
            expected[seed] = (await ref.collect(), ref.finish_reason)
    assert len(set(expected.values())) > 50  # the seeds matter: a cut cannot hide behind repeats

    async def trials(lane: list[int]) -> int:
        cuts = 0
        async with Relay(server.port) as relay:
            url = f"ws://127.0.0.1:{relay.port}/v1/ws"
            async with FerrousClient(url, token=token) as c:
                for seed in lane:
                    direction = rng.choice(["down", "down", "up"])
                    link = relay.cut_after(
                        rng.randrange(0, 900 if direction == "down" else 120), direction
                    )
                    gen = c.generate("random", "x", options=sampled(seed))
                    deltas = [d async for d in gen]
                    assert [d.seq for d in deltas] == list(range(len(deltas))), seed
                    assert ("".join(d.text for d in deltas), gen.finish_reason) == expected[seed]
                    if link.cut.is_set():
                        cuts += 1
                    else:
                        link.budget.update(down=None, up=None)
                assert c.resumes == cuts
        return cuts

    lanes = [seeds[i::4] for i in range(4)]
    cuts = sum(await asyncio.gather(*(trials(lane) for lane in lanes)))
    print(f"\n100 generations, {cuts} cut mid-generation and resumed: all texts exact")
    assert cuts >= 60  # most trials were cut while their generation ran


async def test_the_blocking_client_resumes_too(server: RunningServer, token: str) -> None:
    rng = random.Random(7)
    seeds = list(range(20))
    async with FerrousClient(server.ws_url, token=token, resume=False) as direct:
        expected = {
            seed: await direct.generate("random", "x", options=sampled(seed)).collect()
            for seed in seeds
        }
    async with Relay(server.port) as relay:
        url = f"ws://127.0.0.1:{relay.port}/v1/ws"
        loop = asyncio.get_running_loop()

        def run() -> int:
            cuts = 0
            with SyncFerrousClient(url, token=token) as c:
                for seed in seeds:
                    direction = rng.choice(["down", "up"])
                    budget = rng.randrange(0, 900 if direction == "down" else 120)
                    link = asyncio.run_coroutine_threadsafe(
                        _cut(relay, budget, direction), loop
                    ).result()
                    gen = c.generate("random", "x", options=sampled(seed))
                    deltas = list(gen)
                    assert [d.seq for d in deltas] == list(range(len(deltas))), seed
                    assert "".join(d.text for d in deltas) == expected[seed], seed
                    cuts += link.cut.is_set()
                    link.budget.update(down=None, up=None)
                assert c.resumes == cuts
            return cuts

        assert await asyncio.to_thread(run) >= 10


async def _cut(relay: Relay, budget: int, direction: str) -> Any:
    return relay.cut_after(budget, direction)


async def test_resume_sends_exactly_what_was_missed_and_keeps_the_conversation(
    server: RunningServer, token: str
) -> None:
    async with client(server, token, hello=False) as c:
        ready = await c.hello()
        assert ready.resume_token and ready.resume_window > 0 and not ready.resumed
        await c.send(
            m.Chat(
                "a",
                "slow",
                [m.ChatMessage("user", "hello")],
                options=msgspec_replace(GREEDY, max_tokens=120),
            )
        )
        seen: list[m.ServerMessage] = []
        while sum(isinstance(x, m.Delta) for x in seen) < 10:
            seen.append(await c.recv())
        c.ws.transport.abort()
    started = seen[0]
    assert isinstance(started, m.Started) and started.conversation
    numbers = [x.n for x in seen if not isinstance(x, m.Ready)]
    assert numbers == list(range(1, len(numbers) + 1))
    last = numbers[-1]
    async with client(server, token, hello=False) as c2:
        await c2.send(m.Hello(resume=ready.resume_token, last=last))
        again = await c2.recv()
        assert isinstance(again, m.Ready) and again.resumed and again.session == ready.session
        assert again.generations == ["a"]
        deltas, done, other = await c2.until_done("a")
        assert other == []
        assert deltas[0].n == last + 1
        before = [x for x in seen if isinstance(x, m.Delta)]
        every = before + deltas
        assert [d.seq for d in every] == list(range(len(every)))
        assert (
            "".join(d.text for d in every) == (SCRIPT * 20)[: len("".join(d.text for d in every))]
        )
        assert done.finish_reason == "length" and done.usage.completion_tokens == 120
        # The conversation holds the turn answered while no connection was attached.
        await c2.send(
            m.Chat(
                "b",
                "slow",
                [m.ChatMessage("user", "more")],
                started.conversation,
                msgspec_replace(GREEDY, max_tokens=5),
            )
        )
        _, second, _ = await c2.until_done("b")
        assert second.usage.prompt_tokens > 120


async def test_a_detached_generation_pauses_when_its_replay_buffer_is_full(
    server: RunningServer, token: str
) -> None:
    engine = server.gateway.engine
    async with client(server, token, hello=False) as c:
        ready = await c.hello()
        await c.send(m.Generate("g", "slow", "x", msgspec_replace(GREEDY, max_tokens=1000)))
        assert isinstance(await c.recv(), m.Started)
        c.ws.transport.abort()
    # The replay budget and the ring (4 KiB each) fill long before 1000 tokens:
    # then the worker holds the generation.
    async with asyncio.timeout(30):
        while True:
            made = sum(w.tokens_generated for w in (await engine.health()).workers)
            await asyncio.sleep(0.3)
            if sum(w.tokens_generated for w in (await engine.health()).workers) == made:
                break
    assert made < 1000
    async with client(server, token, hello=False) as c2:
        await c2.send(m.Hello(resume=ready.resume_token, last=1))
        assert (await c2.recv()).resumed  # type: ignore[union-attr]
        deltas, done, _ = await c2.until_done("g")
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert done.usage.completion_tokens == 1000


async def test_resume_after_the_window_is_refused_as_expired(
    server: RunningServer, token: str
) -> None:
    server.gateway.resumable.window = 0.3
    engine = server.gateway.engine
    async with client(server, token, hello=False) as c:
        ready = await c.hello()
        await c.send(m.Generate("g", "slow", "x", msgspec_replace(GREEDY, max_tokens=3000)))
        assert isinstance(await c.recv(), m.Started)
        c.ws.transport.abort()
    async with asyncio.timeout(15):  # the window passes: the session and its generation end
        while len(server.gateway.resumable) or server.gateway.sessions:
            await asyncio.sleep(0.05)
        while sum(w.active for w in (await engine.health()).workers):
            await asyncio.sleep(0.05)
    async with client(server, token, hello=False) as c2:
        await c2.send(m.Hello(resume=ready.resume_token, last=1))
        err = await c2.recv()
        assert isinstance(err, m.Error) and err.code is ErrorCode.RESUME_EXPIRED
        fresh = await c2.recv()
        assert isinstance(fresh, m.Ready) and not fresh.resumed
        assert fresh.session != ready.session and fresh.resume_token != ready.resume_token


async def test_another_users_resume_token_is_refused(server: RunningServer, token: str) -> None:
    bob = server.gateway.auth.issue_token(sub="bob", ttl=600)
    async with client(server, token, hello=False) as c:
        ready = await c.hello()
        await c.send(m.Generate("g", "slow", "x", msgspec_replace(GREEDY, max_tokens=60)))
        assert isinstance(await c.recv(), m.Started)
        c.ws.transport.abort()
    async with client(server, bob, hello=False) as thief:
        await thief.send(m.Hello(resume=ready.resume_token, last=0))
        err = await thief.recv()
        assert isinstance(err, m.Error) and err.code is ErrorCode.FORBIDDEN
        fresh = await thief.recv()
        assert isinstance(fresh, m.Ready) and fresh.user == "bob" and not fresh.resumed
        assert fresh.session != ready.session
    # The owner still resumes it, whole.
    async with client(server, token, hello=False) as c2:
        await c2.send(m.Hello(resume=ready.resume_token, last=1))
        assert (await c2.recv()).resumed  # type: ignore[union-attr]
        deltas, done, _ = await c2.until_done("g")
        assert done.usage.completion_tokens == 60 and deltas[0].seq == 0


async def test_a_resume_that_cannot_be_honoured_ends_the_session_and_its_old_connection(
    server: RunningServer, token: str
) -> None:
    """A hello naming messages never sent (or long gone) while the old connection is
    still open: resume_expired, and the session ends there too, not half."""
    async with client(server, token, hello=False) as old:
        ready = await old.hello()
        await old.send(m.Generate("g", "slow", "x", msgspec_replace(GREEDY, max_tokens=3000)))
        assert isinstance(await old.recv(), m.Started)
        async with client(server, token, hello=False) as new:
            await new.send(m.Hello(resume=ready.resume_token, last=2**60))
            err = await new.recv()
            assert isinstance(err, m.Error) and err.code is ErrorCode.RESUME_EXPIRED
            assert not (await new.recv()).resumed  # type: ignore[union-attr]
        with pytest.raises(Exception) as closed:
            while True:
                await old.recv()
        assert closed.value.rcvd.code == 4000  # type: ignore[attr-defined]
    await _engine_idle(server)
    assert [s for s in server.gateway.sessions if s.id == ready.session] == []


async def test_a_close_the_client_asks_for_ends_the_session(
    server: RunningServer, token: str
) -> None:
    async with client(server, token, hello=False) as c:
        ready = await c.hello()
        await c.send(m.Generate("g", "slow", "x", msgspec_replace(GREEDY, max_tokens=3000)))
        assert isinstance(await c.recv(), m.Started)
    await _engine_idle(server)
    async with client(server, token, hello=False) as c2:
        await c2.send(m.Hello(resume=ready.resume_token, last=1))
        err = await c2.recv()
        assert isinstance(err, m.Error) and err.code is ErrorCode.RESUME_EXPIRED


async def test_a_resume_takes_the_session_from_a_connection_that_looks_alive(
    server: RunningServer, token: str
) -> None:
    async with client(server, token, hello=False) as old:
        ready = await old.hello()
        await old.send(m.Generate("g", "slow", "x", msgspec_replace(GREEDY, max_tokens=80)))
        first = await old.recv()
        assert isinstance(first, m.Started) and first.n == 1
        async with client(server, token, hello=False) as new:
            await new.send(m.Hello(resume=ready.resume_token, last=1))
            assert (await new.recv()).resumed  # type: ignore[union-attr]
            deltas, done, _ = await new.until_done("g")
            assert [d.seq for d in deltas] == list(range(len(deltas)))
            assert done.usage.completion_tokens == 80
        with pytest.raises(Exception) as closed:
            while True:
                await old.recv()
        assert getattr(closed.value, "rcvd", None) is not None
        assert closed.value.rcvd.code == 4000  # type: ignore[attr-defined]


async def test_the_sdk_acks_so_the_server_frees_its_buffer(
    server: RunningServer, token: str
) -> None:
    async with FerrousClient(server.ws_url, token=token) as c:
        text = await c.generate(
            "script", "x", options={"temperature": 0, "max_tokens": 26}
        ).collect()
        assert text == SCRIPT * 2
        session = next(s for s in server.gateway.sessions if s.id == c.ready.session)
        async with asyncio.timeout(10):
            while session._log is not None and session._log.bytes:
                await asyncio.sleep(0.02)


async def test_the_sdk_raises_resume_expired_and_goes_on_with_a_new_session(
    server: RunningServer, token: str
) -> None:
    async with Relay(server.port) as relay:
        url = f"ws://127.0.0.1:{relay.port}/v1/ws"
        async with FerrousClient(url, token=token) as c:
            first = c.ready.session
            gen = c.generate("slow", "x", options={"temperature": 0, "max_tokens": 3000})
            await anext(gen)
            # The server forgets dropped sessions fast now; the client, told 30 s by
            # its ready, cannot reach the server for a second.
            server.gateway.resumable.window = 0.2
            relay.accepting = False
            relay.cut_after(0)
            await asyncio.sleep(1.0)
            relay.accepting = True
            with pytest.raises(ResumeExpired):
                while True:
                    await anext(gen)
            assert c.connected and c.ready.session != first and c.resumes == 0
            assert (
                await c.generate(
                    "script", "x", options={"temperature": 0, "max_tokens": 13}
                ).collect()
                == SCRIPT
            )


def msgspec_replace(options: m.Options, **changes: object) -> m.Options:
    import msgspec

    return msgspec.structs.replace(options, **changes)


async def _engine_idle(server: RunningServer) -> None:
    """Wait until no generation runs in the engine (the session's were cancelled)."""
    engine = server.gateway.engine
    async with asyncio.timeout(15):
        while sum(w.active for w in (await engine.health()).workers):
            await asyncio.sleep(0.05)
