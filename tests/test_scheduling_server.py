"""Scheduling through a real server: queued positions, priority caps, tenant quotas.

The decisions are pure modules (engine.fairqueue, engine.preemption,
gateway.quotas), tested here without processes first; then a real gateway on
a loopback port with real WebSocket and HTTP clients shows them hold.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from engine.preemption import Runner, interrupts, victim
from gateway.auth import Principal
from gateway.config import QuotasConfig
from gateway.generation import effective_priority
from gateway.quotas import Quota, QuotaBook
from gateway.scopes import ALL_SCOPES, DEFAULT_SCOPES
from protocol import messages as m
from protocol.errors import RateLimited

from .gateway_helpers import Client, client, gateway, server_config

# -- pure decisions -------------------------------------------------------------------------


def test_a_lower_class_pays_first_then_the_tenant_over_its_share() -> None:
    running = [Runner(1, "A", 0, 1), Runner(2, "A", 0, 2), Runner(3, "B", -1, 3)]
    assert victim(running, Runner(9, "C", 0, 9)) == Runner(3, "B", -1, 3)
    running = [Runner(1, "A", 0, 1), Runner(2, "A", 0, 2), Runner(3, "B", 0, 3)]
    assert victim(running, Runner(9, "C", 0, 9)) == Runner(2, "A", 0, 2)  # A holds 2, C 0
    assert victim(running, Runner(9, "B", 0, 9)) is None  # B holds 1, A 2: a fair share
    assert victim(running, Runner(9, "A", 0, 9)) is None
    assert victim([Runner(1, "A", 5, 1)], Runner(9, "B", 0, 9)) is None  # a higher class
    assert victim([], Runner(9, "B", 9, 9)) is None


def test_who_cuts_a_step_in_progress_short() -> None:
    """A higher class than everyone running, or a pausing arrival on a full worker,
    interrupts the step; a peer that will only join the next step does not."""
    running = [Runner(1, "A", 0, 1), Runner(2, "A", 0, 2)]
    assert interrupts(running, Runner(9, "B", 5, 9), slots=4)  # a higher class
    assert not interrupts(running, Runner(9, "B", 0, 9), slots=4)  # a free slot: no hurry
    assert interrupts(running, Runner(9, "B", 0, 9), slots=2)  # full: it pauses one of A's
    assert not interrupts(running, Runner(9, "A", 0, 9), slots=2)  # A's own: it waits
    assert not interrupts([], Runner(9, "B", 5, 9), slots=2)  # an idle worker


def test_priority_is_capped_by_the_credential() -> None:
    user = Principal("u", None, "api_key", None, DEFAULT_SCOPES, max_priority=3)
    assert effective_priority(user, 50) == 3
    assert effective_priority(user, 2) == 2
    assert effective_priority(user, -20) == -20  # one's own background work is always fine
    admin = Principal("root", None, "jwt", None, ALL_SCOPES)
    assert effective_priority(admin, 100) == 100


def test_quotas_refuse_with_retry_after_and_recover() -> None:
    now = [1000.0]
    book = QuotaBook(clock=lambda: now[0])
    quota = Quota(concurrent=2, requests_per_minute=3, tokens_per_minute=100)
    a, b = book.admit("t", quota), book.admit("t", quota)
    with pytest.raises(RateLimited) as e:
        book.admit("t", quota)
    assert "2 generations" in e.value.message and e.value.retry_after == 1.0
    a.release(10)
    a.release(10)  # idempotent
    b.release(95)  # 105 tokens used: the bucket is in debt
    with pytest.raises(RateLimited) as e:
        book.admit("t", quota)
    assert "tokens per minute" in e.value.message
    assert e.value.retry_after is not None and 3.0 <= e.value.retry_after <= 3.7
    now[0] += 4.0  # the debt is repaid at 100 tokens a minute
    book.admit("t", quota).release()
    with pytest.raises(RateLimited) as e:  # the fourth request within the minute
        book.admit("t", quota)
    assert "3 requests per minute" in e.value.message
    assert e.value.retry_after is not None and 0 < e.value.retry_after <= 20.0
    now[0] += e.value.retry_after
    book.admit("t", quota).release()
    assert book.active("t") == 0
    # Another tenant, and an unlimited quota, are not affected.
    book.admit("u", quota)
    for _ in range(50):
        book.admit("t", Quota())


# -- through the server -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _one_slot_taken(tmp_path: Path, slow_model: Path) -> AsyncIterator[tuple[Client, Client]]:
    """A server with one sequence slot, which client ``a``'s generation ``long`` holds;
    client ``b`` is free to queue behind it."""
    config = server_config(tmp_path, {"slow": slow_model}, seqs_per_worker=1)
    async with gateway(config) as srv:
        auth = srv.gateway.auth
        async with (
            client(srv, auth.issue_token(sub="a", ttl=600)) as a,
            client(srv, auth.issue_token(sub="b", ttl=600)) as b,
        ):
            await a.send(m.Generate("long", "slow", "hi", options=m.Options(max_tokens=100000)))
            while not isinstance(await a.recv(), m.Delta):
                pass
            yield a, b


async def test_queued_positions_count_down_to_started(tmp_path: Path, slow_model: Path) -> None:
    async with _one_slot_taken(tmp_path, slow_model) as (a, b):
        for i in range(3):
            await b.send(m.Generate(f"g{i}", "slow", "hi", options=m.Options(max_tokens=2)))
        seen: dict[str, list[m.ServerMessage]] = {f"g{i}": [] for i in range(3)}
        while sum(isinstance(x, m.Queued) for x in seen["g2"]) < 1:
            msg = await b.recv()
            seen[msg.id].append(msg)  # type: ignore[union-attr]
        await a.send(m.Cancel("long"))
        done = 0
        while done < 3:
            msg = await b.recv()
            seen[msg.id].append(msg)  # type: ignore[union-attr]
            done += isinstance(msg, m.Done)
    for i in range(3):
        kinds = [type(x).__name__ for x in seen[f"g{i}"]]
        first_started = kinds.index("Started")
        assert all(k == "Queued" for k in kinds[:first_started]), kinds
        assert kinds[-1] == "Done" and kinds.count("Started") == 1
        places = [x.position for x in seen[f"g{i}"] if isinstance(x, m.Queued)]
        assert places and places[0] == i  # g0 is next, g2 has two ahead
        assert places == sorted(places, reverse=True) and len(set(places)) == len(places)


async def test_a_generation_cancelled_while_queued_ends_without_started(
    tmp_path: Path, slow_model: Path
) -> None:
    async with _one_slot_taken(tmp_path, slow_model) as (a, b):
        await b.send(m.Generate("q", "slow", "hi", options=m.Options(max_tokens=2)))
        seen = [await b.recv()]
        while not isinstance(seen[-1], m.Queued):
            seen.append(await b.recv())
        await b.send(m.Cancel("q"))
        while not isinstance(seen[-1], m.Done):
            seen.append(await b.recv())
        await a.send(m.Cancel("long"))
    kinds = [type(x).__name__ for x in seen]
    assert set(kinds[:-1]) == {"Queued"}, kinds
    done = seen[-1]
    assert isinstance(done, m.Done) and done.finish_reason == "cancelled"
    assert done.usage.completion_tokens == 0


async def test_tenant_quotas_refuse_typed_with_retry_after(
    tmp_path: Path, okay_model: Path
) -> None:
    quotas = QuotasConfig(tenants={"acme": Quota(requests_per_minute=2)})
    config = server_config(tmp_path, {"okay": okay_model}, quotas=quotas)
    async with gateway(config) as srv:
        auth = srv.gateway.auth
        acme = auth.api_keys.create("u1", "acme")
        other = auth.api_keys.create("u2", "globex")

        def ask(key: str) -> httpx.Response:
            return httpx.post(
                srv.http_url + "/v1/chat/completions",
                json={"model": "okay", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )

        for _ in range(2):
            assert (await asyncio.to_thread(ask, acme)).status_code == 200
        refused = await asyncio.to_thread(ask, acme)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        assert (await asyncio.to_thread(ask, other)).status_code == 200  # another tenant
        # On the WebSocket the same refusal is an error message with retry_after.
        async with client(srv, acme) as ws:
            await ws.send(m.Generate("g", "okay", "hi"))
            err = await ws.recv()
            assert isinstance(err, m.Error) and err.code == "rate_limited"
            assert err.retryable and err.retry_after is not None and err.retry_after > 0
        # A JWT quota claim sets its bearer's limits: one generation at a time.
        solo = auth.issue_token(sub="solo", tenant="acme", ttl=600, quota=Quota(concurrent=1))
        async with client(srv, solo) as ws:
            endless = m.Options(max_tokens=100000, ignore_eos=True)
            await ws.send(m.Generate("g1", "okay", "hi", options=endless))
            while not isinstance(await ws.recv(), m.Delta):
                pass
            await ws.send(m.Generate("g2", "okay", "hi", options=m.Options(max_tokens=1)))
            while not isinstance(err := await ws.recv(), m.Error):
                pass
            assert err.id == "g2" and err.code == "rate_limited"
            await ws.send(m.Cancel("g1"))
            await ws.until_done("g1")
            # The first one ended: the next is admitted again.
            await ws.send(m.Generate("g3", "okay", "hi", options=m.Options(max_tokens=1)))
            _, done, _ = await ws.until_done("g3")
            assert done.finish_reason in ("stop", "length")
        # Per tenant and model: the refusals and the tokens each tenant used.
        metrics = (await asyncio.to_thread(httpx.get, srv.http_url + "/metrics")).text
        samples = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(("ferrous_generation_refusals_total", "ferrous_tenant_tokens_total"))
        }
        refused_acme = (
            'ferrous_generation_refusals_total{model="okay",reason="rate_limited",tenant="acme"}'
        )
        assert samples[refused_acme] == 3
        completion = 'ferrous_tenant_tokens_total{kind="completion",model="okay",tenant="%s"}'
        assert samples[completion % "acme"] > 0 and samples[completion % "globex"] > 0
