"""Who starts next when every slot is busy: priority, then turns between tenants.

The decision is a pure queue (engine.fairqueue), tested without processes;
then the engine is flooded by one tenant and the order in which generations
start (their first tokens, with one slot) shows another tenant's request
taking the next turn, a bounded queue refusing with ``overloaded``, and a
request cancelled while waiting never starting.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec
import pytest

from engine import (
    EngineClient,
    EngineConfig,
    GenerateRequest,
    SamplingParams,
    TokenDelta,
    admission,
    fairqueue,
)
from engine.admission import Admission
from engine.fairqueue import FairQueue
from engine.onnx.decoder import TinyDecoderSpec
from engine.onnx.tinydecoder import write_tiny_decoder
from engine.preemption import Runner
from protocol.errors import Overloaded

# -- the queue -------------------------------------------------------------------------


def _drain(q: FairQueue[str]) -> list[str]:
    out = []
    while (e := q.pop()) is not None:
        out.append(e.handle)
    return out


def test_tenants_take_turns_and_each_keeps_its_own_order() -> None:
    q: FairQueue[str] = FairQueue(100)
    for i in range(5):
        q.push("A", 0, f"a{i}")
    q.push("B", 0, "b0")
    q.push("C", 0, "c0")
    q.push("B", 0, "b1")
    assert _drain(q) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]


def test_turns_follow_weights_and_tokens_served() -> None:
    """A tenant of weight 2 gets two turns per turn of a tenant of weight 1; a tenant
    whose generations turned out long waits longer for its next turn; a tenant back
    from a quiet spell starts level with the others, not with a credit."""
    q: FairQueue[str] = FairQueue(100)
    q.estimate = 100
    for i in range(4):
        q.push("A", 0, f"a{i}", weight=2.0)
        q.push("B", 0, f"b{i}")
    assert _drain(q) == ["a0", "b0", "a1", "b1", "a2", "a3", "b2", "b3"]

    q = FairQueue(100)
    q.estimate = 100
    for i in range(3):
        q.push("A", 0, f"a{i}")
        q.push("B", 0, f"b{i}")
    assert q.pop().handle == "a0"  # type: ignore[union-attr]
    assert q.pop().handle == "b0"  # type: ignore[union-attr]
    q.charge("A", 900 - 100)  # a0 read and wrote 900 tokens, not the 100 estimated
    assert _drain(q) == ["b1", "b2", "a1", "a2"]

    q.push("C", 0, "c0")  # new: starts at the clock, level with the last one served
    q.push("B", 0, "b3")
    assert _drain(q) == ["c0", "b3"]


def test_higher_priority_first_and_positions_match_the_order() -> None:
    q: FairQueue[str] = FairQueue(100)
    entries = [q.push("A", 0, "a0"), q.push("A", 0, "a1"), q.push("B", 0, "b0")]
    urgent = q.push("C", 5, "c-urgent")
    entries.append(urgent)
    order = ["c-urgent", "a0", "b0", "a1"]
    for e in entries:
        assert q.position(e) == order.index(e.handle)
    assert _drain(q) == order


def test_the_queue_is_bounded_and_entries_can_leave() -> None:
    q: FairQueue[str] = FairQueue(2)
    a = q.push("A", 0, "a")
    q.push("B", 0, "b")
    with pytest.raises(Overloaded):
        q.push("C", 0, "c")
    assert q.remove(a) and not q.remove(a)
    assert len(q) == 1
    q.push("C", 0, "c")
    assert _drain(q) == ["b", "c"]


def test_places_follow_every_change_of_the_queue() -> None:
    """Places come from one replay kept until the queue changes: each change (an
    arrival, a start, a leaver, a correction, a new estimate) gives fresh places."""
    q: FairQueue[str] = FairQueue(100)
    q.estimate = 100
    a0, a1, b0 = q.push("A", 0, "a0"), q.push("A", 0, "a1"), q.push("B", 0, "b0")
    assert [q.position(e) for e in (a0, b0, a1)] == [0, 1, 2]
    c0 = q.push("C", 0, "c0")
    assert [q.position(e) for e in (a0, b0, c0, a1)] == [0, 1, 2, 3]
    q.charge("B", 1000)  # B's last generation turned out long
    assert [q.position(e) for e in (a0, c0, a1, b0)] == [0, 1, 2, 3]
    assert q.remove(c0)
    with pytest.raises(ValueError):
        q.position(c0)
    assert q.pop() is a0
    assert [q.position(e) for e in (a1, b0)] == [0, 1]
    q = FairQueue(100)
    q.estimate = 100
    a0, a1, b0 = q.push("A", 0, "a0"), q.push("A", 0, "a1"), q.push("B", 0, "b0")
    q.charge("B", 150)
    assert [q.position(e) for e in (a0, a1, b0)] == [0, 1, 2]
    q.estimate = 200  # each start charges more: after a0, A is past B
    assert [q.position(e) for e in (a0, b0, a1)] == [0, 1, 2]


def test_service_records_stay_bounded_with_ever_new_tenants() -> None:
    """Tenants served without waiting (a free slot) leave a record only while it
    matters; ever new tenants never grow the records past the bound."""
    q: FairQueue[str] = FairQueue(8)
    for i in range(5000):
        q.charge(f"u{i}", q.estimate)  # started at once
        q.charge(f"u{i}", 50 - q.estimate)  # ended after 50 tokens
    assert len(q._served) <= max(fairqueue.MIN_TENANTS, 4 * q.limit)
    waiting = q.push("w", 0, "w0")
    q.charge("w", 10**6)
    for i in range(5000):
        q.charge(f"v{i}", q.estimate)
    assert "w" in q._served  # a waiting tenant's record is never dropped
    assert q.position(waiting) == 0


async def test_the_wait_estimate_counts_no_quiet_time_and_corrections_always_land() -> None:
    """Starts a second apart give a 1 s estimate, a quiet hour in between does not
    count; a generation's real token count corrects its tenant's charge and the
    model's estimate even when nobody was waiting as it ended."""
    now = [1000.0]

    class Seat:
        def __init__(self) -> None:
            self.index = 0
            self.alive = True
            self.models = {"m": 1.0}
            self.load: dict[str, int] = {}
            self.runners: dict[str, dict[int, Runner]] = {}

    seat = Seat()
    adm: Admission[Seat] = Admission(lambda: [seat], lambda model: 1, 8)
    clock = admission.time.monotonic
    admission.time.monotonic = lambda: now[0]  # type: ignore[assignment]
    try:

        async def admit(i: int) -> int:
            return (await adm.admit(_req(f"r{i}", "A", 8)))[1]

        key = await admit(0)
        for i in (1, 2):
            waiter = asyncio.create_task(admit(i))
            await asyncio.sleep(0)
            now[0] += 1
            adm.leave(seat, "m", key)
            key = await waiter
        assert adm._estimate("m", 0) == 1.0
        adm.leave(seat, "m", key, tokens=5000)  # nobody waits: the correction still lands
        queue = adm._queues["m"]
        assert queue.estimate > 256 and queue._served.get("A", 0) >= 5000
        now[0] += 3600
        key = await admit(3)
        waiter = asyncio.create_task(admit(4))
        await asyncio.sleep(0)
        now[0] += 1
        adm.leave(seat, "m", key)
        key = await waiter
        assert adm._estimate("m", 0) == 1.0  # not an hour
    finally:
        admission.time.monotonic = clock  # type: ignore[assignment]


# -- the engine --------------------------------------------------------------------------


def _req(rid: str, tenant: str, tokens: int, priority: int = 0) -> GenerateRequest:
    return GenerateRequest(
        model="m",
        prompt="hi",
        sampling=SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True),
        request_id=rid,
        tenant=tenant,
        priority=priority,
    )


async def test_a_flood_from_one_tenant_does_not_hold_back_another(slow_model: Path) -> None:
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1, max_queued=8)
    async with EngineClient(config) as engine:
        await engine.load("m", slow_model)
        started: list[str] = []

        async def run(req: GenerateRequest) -> str:
            async for ev in engine.generate(req):
                if isinstance(ev, TokenDelta) and ev.seq == 0:
                    started.append(req.request_id)
            return req.request_id

        first = asyncio.create_task(run(_req("a0", "A", 40)))
        while not started:
            await asyncio.sleep(0.01)
        flood = [asyncio.create_task(run(_req(f"a{i}", "A", 3))) for i in range(1, 6)]
        while engine.queued("m") < 5:
            await asyncio.sleep(0.01)
        late = asyncio.create_task(run(_req("b0", "B", 3)))
        while engine.queued("m") < 6:
            await asyncio.sleep(0.01)
        # A higher class does not queue: it pauses a0 and starts at once.
        urgent = asyncio.create_task(run(_req("c0", "C", 3, priority=1)))
        while "c0" not in started:
            await asyncio.sleep(0.01)
        doomed = asyncio.create_task(run(_req("a9", "A", 3)))
        extra = asyncio.create_task(run(_req("a10", "A", 3)))
        while engine.queued("m") < 8:
            await asyncio.sleep(0.01)
        # The queue is full: the next request is refused at once, typed.
        with pytest.raises(Overloaded):
            await run(_req("x", "D", 3))
        doomed.cancel()
        await asyncio.gather(first, *flood, late, urgent, extra)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        # The urgent request first, then B (A was already served a0), then A's.
        assert started[:4] == ["a0", "c0", "b0", "a1"]
        everyone = ["a0", "a1", "a2", "a3", "a4", "a5", "a10", "b0", "c0"]
        assert sorted(started) == sorted(everyone)
        assert "a9" not in started  # cancelled while waiting: never started
        assert engine.queued("m") == 0


# -- through the server ------------------------------------------------------------------


async def test_a_full_queue_is_refused_with_retry_after(tmp_path: Path, slow_model: Path) -> None:
    import httpx

    from gateway.config import LimitsConfig
    from protocol import messages as m

    from .gateway_helpers import client, gateway, server_config

    config = server_config(
        tmp_path,
        {"slow": slow_model},
        seqs_per_worker=1,
        limits=LimitsConfig(max_queued_generations=1),
    )
    async with gateway(config) as srv:
        auth = srv.gateway.auth
        async with (
            client(srv, auth.issue_token(sub="a", ttl=600)) as a,
            client(srv, auth.issue_token(sub="b", ttl=600)) as b,
        ):
            long = m.Options(max_tokens=100000, temperature=0.0)
            await a.send(m.Generate("g1", "slow", "hi", options=long))
            while not isinstance(first := await a.recv(), m.Delta):
                assert isinstance(first, m.Started)
            # Running: the only slot is taken.
            await b.send(m.Generate("g2", "slow", "hi", options=m.Options(max_tokens=2)))
            while srv.gateway.engine.queued("slow") < 1:
                await asyncio.sleep(0.01)

            def third() -> httpx.Response:
                token = auth.issue_token(sub="c", ttl=600)
                return httpx.post(
                    srv.http_url + "/v1/generate",
                    json={"model": "slow", "prompt": "hi", "stream": False},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=60,
                )

            r = await asyncio.to_thread(third)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"] == "1"

            def compatible(path: str, body: dict[str, object]) -> httpx.Response:
                token = auth.issue_token(sub="c", ttl=600)
                return httpx.post(
                    srv.http_url + path,
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=60,
                )

            chat = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
            for stream in (False, True):  # a stream is refused before its status line
                r = await asyncio.to_thread(
                    compatible, "/v1/chat/completions", {**chat, "stream": stream}
                )
                assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
                assert r.headers["retry-after"] == "1"
            r = await asyncio.to_thread(
                compatible, "/api/chat", {**chat, "stream": False, "priority": -1}
            )
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["code"] == "overloaded" and "waiting" in r.json()["error"]
            await a.send(m.Cancel("g1"))
            _, done, _ = await b.until_done("g2")  # the queued one starts once the slot frees
            assert done.finish_reason == "length"
            await a.until_done("g1")  # read: an unread client holds up its own close
        scraped = srv.gateway.metrics.render().decode()
    refused = 'ferrous_generation_refusals_total{model="slow",reason="overloaded",tenant=""} 4.0'
    assert refused in scraped
    # g1 started at once, g2 after waiting: both counted under the shared tenant label.
    assert 'ferrous_queue_wait_seconds_count{model="slow",tenant=""} 2.0' in scraped


# -- preemption ----------------------------------------------------------------------------


async def _text(engine: EngineClient, req: GenerateRequest, order: list[str]) -> str:
    parts = []
    async for ev in engine.generate(req):
        if isinstance(ev, TokenDelta):
            if ev.seq == 0:
                order.append(f"start {req.request_id}")
            parts.append(ev.text)
        else:
            assert ev.error is None, ev.error
            order.append(f"done {req.request_id}")
    return "".join(parts)


def _sampled(rid: str, tenant: str, priority: int = 0, tokens: int = 300) -> GenerateRequest:
    return GenerateRequest(
        model="m",
        prompt="Once upon a time",
        sampling=SamplingParams(temperature=0.9, seed=42, max_tokens=tokens, ignore_eos=True),
        request_id=rid,
        tenant=tenant,
        priority=priority,
    )


async def test_a_preempted_sequence_resumes_without_losing_or_repeating_a_token(
    random_model: Path,
) -> None:
    """One slot: a higher class pauses a running seeded generation, which resumes
    once it is done; its text is the same seed's uninterrupted text."""
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1)
    async with EngineClient(config) as engine:
        await engine.load("m", random_model)
        alone = await _text(engine, _sampled("ref", "A"), [])
        order: list[str] = []
        long = asyncio.create_task(_text(engine, _sampled("low", "A"), order))
        while "start low" not in order:
            await asyncio.sleep(0.005)
        urgent = await _text(engine, _req("high", "B", 5, priority=3), order)
        assert await long == alone
    assert urgent
    # The urgent one ran to its end while the long one was paused.
    assert order == ["start low", "start high", "done high", "done low"]


@pytest.mark.parametrize("fused", [False, True], ids=["copied-kv", "shared-kv"])
async def test_an_onnx_sequence_is_preempted_and_resumes_exactly(
    fused: bool, tmp_path: Path
) -> None:
    """The same on the ONNX backend, both ways it keeps keys and values: each sequence
    its own arrays, or one buffer the fused graph appends to (the paused sequence's
    rows move out and back). A context of 4096 keeps the long one running for seconds."""
    spec = TinyDecoderSpec(n_ctx=4096)
    folder = write_tiny_decoder(tmp_path / "m", seed=3, spec=spec, fused=fused)
    (folder / "model.gguf").unlink()  # the ONNX graph, not its GGUF twin
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1)
    async with EngineClient(config) as engine:
        await engine.load("m", folder)
        alone = await _text(engine, _sampled("ref", "A", tokens=2000), [])
        order: list[str] = []
        long = asyncio.create_task(_text(engine, _sampled("low", "A", tokens=2000), order))
        while "start low" not in order:
            await asyncio.sleep(0.002)
        urgent = await _text(engine, _req("high", "B", 5, priority=3), order)
        assert await long == alone
    assert urgent and len(alone) > 1000
    assert order == ["start low", "start high", "done high", "done low"]


async def test_a_tenant_over_its_share_gives_a_slot_to_another(slow_model: Path) -> None:
    """Two slots, both held by tenant A, and more of A's requests waiting: tenant B's
    request pauses one of A's (A holds two, B none) and starts before any ends."""
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=2)
    async with EngineClient(config) as engine:
        await engine.load("m", slow_model)
        order: list[str] = []
        a = [asyncio.create_task(_text(engine, _req(f"a{i}", "A", 300), order)) for i in range(4)]
        while engine.queued("m") < 2 or sum(x.startswith("start a") for x in order) < 2:
            await asyncio.sleep(0.005)
        await _text(engine, _req("b", "B", 3), order)
        texts = await asyncio.gather(*a)
    assert order[:4] == ["start a0", "start a1", "start b", "done b"]
    assert all(t == texts[0] and len(t) > 0 for t in texts)  # nothing lost or repeated


# -- placement -----------------------------------------------------------------------------


async def test_a_follow_up_turn_goes_to_the_worker_holding_its_conversation(
    script_model: Path,
) -> None:
    """Two workers: the next turn of a conversation goes where its history is cached,
    though the least loaded worker is the other one."""
    from engine import ChatMessage

    config = EngineConfig(workers=2, threads_per_worker=1, seqs_per_worker=2)
    async with EngineClient(config) as engine:
        await engine.load("m", script_model)
        pids: dict[str, int] = {}

        async def hold(rid: str) -> asyncio.Task[str]:
            task = asyncio.create_task(_text(engine, _req(rid, "X", 100000), []))
            while rid not in engine.placements():
                await asyncio.sleep(0.005)
            pids[rid] = engine.placements()[rid]
            return task

        def turn(rid: str, messages: list[ChatMessage]) -> GenerateRequest:
            return GenerateRequest(
                model="m",
                messages=messages,
                sampling=SamplingParams(temperature=0.0, max_tokens=3),
                request_id=rid,
            )

        long0 = await hold("L0")  # takes the first worker
        history = [ChatMessage("user", "hello " * 40)]
        # Where the short turn runs is read while its first token is in hand: it
        # may be over before a polling loop would look (a loaded machine).
        parts: list[str] = []
        homes: list[int] = []
        async for ev in engine.generate(turn("c1", history)):
            if isinstance(ev, TokenDelta):
                if ev.seq == 0:
                    homes.append(engine.placements()["c1"])
                parts.append(ev.text)
        home, answer = homes[0], "".join(parts)
        assert home != pids["L0"]  # the least loaded: the other worker
        long0.cancel()
        long1 = await hold("L1")  # both idle: the first worker again
        long2 = await hold("L2")  # the least loaded: the conversation's worker
        assert pids["L2"] == home and pids["L1"] != home
        long1.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await long1
        # Now the other worker is idle and the conversation's worker runs L2; the
        # follow-up still goes home (it has a free slot) and reuses its cache.
        history += [ChatMessage("assistant", answer), ChatMessage("user", "and then?")]
        events = []
        async for ev in engine.generate(turn("c2", history)):
            events.append(ev)
            if not isinstance(ev, TokenDelta):
                assert ev.usage.cached_tokens > 40
            elif ev.seq == 0:
                assert engine.placements()["c2"] == home
        long2.cancel()
        for task in (long0, long2):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_weighted_tenants_share_turns_by_weight(slow_model: Path) -> None:
    """Two tenants flood one slot with equal generations: the one of weight 3 starts
    three for each of the other's (asserted from the order of first tokens)."""
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1, max_queued=32)
    async with EngineClient(config) as engine:
        await engine.load("m", slow_model)
        started: list[str] = []

        async def run(rid: str, tenant: str, weight: float, tokens: int = 4) -> None:
            req = msgspec.structs.replace(_req(rid, tenant, tokens), weight=weight)
            async for ev in engine.generate(req):
                if isinstance(ev, TokenDelta) and ev.seq == 0:
                    started.append(rid)

        # X holds the only slot while A and B queue; then it is cancelled.
        first = asyncio.create_task(run("x", "X", 1.0, tokens=100_000))
        while not started:
            await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(run(f"a{i}", "A", 3.0)) for i in range(9)]
        tasks += [asyncio.create_task(run(f"b{i}", "B", 1.0)) for i in range(9)]
        while engine.queued("m") < 18:
            await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.gather(*tasks)
    order = [rid[0] for rid in started[1:13]]
    assert order.count("a") == 9 and order.count("b") == 3, started
