"""State shared by several nodes through a real redis-server: a tenant's quota holds across
replicas, a dead node's share lapses, a quota store that cannot be reached refuses new
generations with a typed, retryable error until it is back, a cancel crosses nodes, and a
conversation started on one node continues on another."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import QuotasConfig, StateConfig
from gateway.quotas import Quota
from gateway.redisquotas import RedisQuotas
from gateway.server import RunningServer
from protocol.errors import Overloaded, RateLimited

from .gateway_helpers import gateway, server_config
from .redisserver import redis_server, start_redis


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path / "redis") as (url, _):
        yield url


async def test_leases_count_across_ledgers_and_lapse_when_a_node_dies(redis_url: str) -> None:
    a = RedisQuotas(redis_url, prefix="t1:", lease_ttl=1.0)
    b = RedisQuotas(redis_url, prefix="t1:", lease_ttl=1.0)
    one = Quota(concurrent=1)
    try:
        lease = await a.admit("u:alice", one)
        with pytest.raises(RateLimited) as err:
            await b.admit("u:alice", one)
        assert err.value.retry_after and "limit is 1" in err.value.message
        await b.admit("u:bob", one)  # another tenant is not held back
        await asyncio.sleep(1.6)  # a keeps renewing its lease while it runs
        with pytest.raises(RateLimited):
            await b.admit("u:alice", one)
        lease.release(0)
        await asyncio.sleep(0.1)
        (await b.admit("u:alice", one)).release()
        await asyncio.sleep(0.1)
        # A node that dies with a generation running: its lease lapses on its own.
        await a.admit("u:carol", one)
        await a.close()  # no release, no renewal: as if the process was killed
        with pytest.raises(RateLimited):
            await b.admit("u:carol", one)
        await asyncio.sleep(1.2)
        await b.admit("u:carol", one)

        rpm = Quota(requests_per_minute=2)
        await a_fresh_admit(redis_url, "u:dave", rpm)
        await b.admit("u:dave", rpm)
        with pytest.raises(RateLimited) as err:
            await b.admit("u:dave", rpm)
        assert err.value.retry_after is not None and 0 < err.value.retry_after <= 30
    finally:
        await b.close()


async def a_fresh_admit(url: str, tenant: str, quota: Quota) -> None:
    ledger = RedisQuotas(url, prefix="t1:")
    try:
        (await ledger.admit(tenant, quota)).release()
    finally:
        await ledger.close()


async def test_a_store_that_cannot_be_reached_refuses_then_recovers(tmp_path: Path) -> None:
    sock = tmp_path / "r" / "redis.sock"
    sock.parent.mkdir()
    proc = start_redis(None, sock)
    ledger = RedisQuotas(f"unix://{sock}", prefix="t2:")
    try:
        (await ledger.admit("u:alice", Quota(concurrent=2))).release()
        proc.terminate()
        proc.wait(10)
        with pytest.raises(Overloaded) as err:
            await ledger.admit("u:alice", Quota(concurrent=2))
        assert err.value.retryable and err.value.retry_after
        # Unlimited tenants are never sent to the store.
        (await ledger.admit("u:free", Quota())).release()
        proc = start_redis(None, sock)
        lease = await ledger.admit("u:alice", Quota(concurrent=2))
        lease.release()
    finally:
        await ledger.close()
        proc.terminate()
        proc.wait(10)


async def _generate(srv: RunningServer, model: str, max_tokens: int) -> httpx.Response:
    token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
    async with httpx.AsyncClient(
        base_url=srv.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        return await c.post(
            "/v1/generate",
            json={"model": model, "prompt": "x", "options": {"max_tokens": max_tokens}},
        )


async def test_two_nodes_share_a_tenants_quota(
    tmp_path: Path, redis_url: str, script_model: Path, slow_model: Path
) -> None:
    state = StateConfig(url=redis_url, prefix="t3:", lease_ttl=5.0)
    quotas = QuotasConfig(concurrent=1)
    models = {"script": script_model, "slow": slow_model}
    async with (
        gateway(server_config(tmp_path / "a", models, state=state, quotas=quotas)) as a,
        gateway(server_config(tmp_path / "b", models, state=state, quotas=quotas)) as b,
    ):
        running = asyncio.create_task(_generate(a, "slow", 100_000))
        for _ in range(200):  # until node a's generation holds the tenant's one place
            await asyncio.sleep(0.05)
            if a.gateway.running:
                break
        r = await _generate(b, "script", 4)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limited" and r.headers.get("retry-after")
        # The client on node a goes away: its generation stops and gives the place back.
        running.cancel()
        for _ in range(100):
            r = await _generate(b, "script", 4)
            if r.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 200, r.text


async def test_a_cancel_at_one_node_stops_a_stream_on_another(
    tmp_path: Path, redis_url: str, script_model: Path, slow_model: Path
) -> None:
    """gRPC ``Cancel`` sent to node b stops the stream node a is serving (pub/sub), and only
    the caller's own: the same id of another user is not touched."""
    import time

    import grpc

    from gateway.config import GrpcConfig
    from gateway.grpcapi import ferrous_pb2 as pb
    from gateway.grpcapi import ferrous_pb2_grpc as pb_grpc

    state = StateConfig(url=redis_url, prefix="t4:")
    on = GrpcConfig(enabled=True, port=0)
    models = {"script": script_model, "slow": slow_model}
    async with (
        gateway(server_config(tmp_path / "a", models, state=state, grpc=on)) as a,
        gateway(server_config(tmp_path / "b", models, state=state, grpc=on)) as b,
        grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as ca,
        grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}") as cb,
    ):

        def creds(node: RunningServer, sub: str) -> tuple[tuple[str, str], ...]:
            # Each test node has its own signing secret (one deployment would share it).
            return (("authorization", "Bearer " + node.gateway.auth.issue_token(sub=sub, ttl=60)),)

        alice, alice_b, bob_b = creds(a, "alice"), creds(b, "alice"), creds(b, "bob")
        stub_a = pb_grpc.FerrousStub(ca)  # type: ignore[no-untyped-call]
        stub_b = pb_grpc.FerrousStub(cb)  # type: ignore[no-untyped-call]
        call = stub_a.Generate(
            pb.GenerateRequest(
                model="slow", prompt="x", id="far", options=pb.Options(max_tokens=100_000)
            ),
            metadata=alice,
        )
        deltas = 0
        asked = 0.0
        async for event in call:
            if event.HasField("delta"):
                deltas += 1
                if deltas == 3:
                    # bob's cancel of the same id reaches node a and stops nothing.
                    await stub_b.Cancel(pb.CancelRequest(id="far"), metadata=bob_b)
                if deltas == 30:
                    asked = time.perf_counter()
                    reply = await stub_b.Cancel(pb.CancelRequest(id="far"), metadata=alice_b)
                    assert reply.cancelled  # node a heard it
            elif event.HasField("done"):
                assert event.done.finish_reason == "cancelled"
                break
        assert deltas >= 30 and asked
        print(f"cross-node cancel: {1000 * (time.perf_counter() - asked):.1f} ms")


async def test_a_conversation_started_on_one_node_continues_on_another(
    tmp_path: Path, redis_url: str, script_model: Path
) -> None:
    """Turns of one conversation on node a, then b, then a: the history each node reads is
    the whole conversation, in order; each owner keeps a bounded number."""
    import redis.asyncio as aioredis

    from engine import ChatMessage as EngineMessage
    from gateway.redisconversations import RedisConversations

    state = StateConfig(url=redis_url, prefix="t5:")
    models = {"script": script_model}
    async with (
        gateway(server_config(tmp_path / "a", models, state=state)) as a,
        gateway(server_config(tmp_path / "b", models, state=state)) as b,
    ):

        async def turn(node: RunningServer, text: str) -> dict[str, object]:
            token = node.gateway.auth.issue_token(sub="alice", ttl=600)
            async with httpx.AsyncClient(
                base_url=node.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
            ) as c:
                r = await c.post(
                    "/v1/chat",
                    json={
                        "model": "script",
                        "conversation": "trip",
                        "messages": [{"role": "user", "content": text}],
                        "options": {"max_tokens": 4, "temperature": 0},
                    },
                )
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]

        first = await turn(a, "hello")
        second = await turn(b, "and then?")  # the other node reads the first turn
        third = await turn(a, "thanks")
        tokens = [x["usage"]["prompt_tokens"] for x in (first, second, third)]  # type: ignore[index]
        assert tokens[0] < tokens[1] < tokens[2]
        history = await b.gateway.conversations.history(("None", "x"), "none", "script")
        assert history.messages == []  # another owner's is not this one
        conv = await a.gateway.conversations.history((None, "alice"), "trip", "script")
        assert [(x.role, x.content[:6]) for x in conv.messages][::2] == [
            ("user", "hello"),
            ("user", "and th"),
            ("user", "thanks"),
        ]
        assert len(conv.messages) == 6

    # The bound per user: the least recently used conversation goes, with its messages.
    store = RedisConversations(redis_url, max_per_user=2, prefix="t6:")
    owner = (None, "bob")
    try:
        for name in ("one", "two", "three"):
            await store.history(owner, name, "m")
            store.append(owner, name, [EngineMessage("user", name)])
        assert (await store.history(owner, "three", "m")).messages[0].content == "three"
        assert (await store.history(owner, "one", "m")).messages == []  # dropped
        assert await store.forget(owner, "three") and not await store.forget(owner, "nope")
    finally:
        await store.close()
    client = aioredis.from_url(redis_url)
    try:
        assert not await client.exists('t6:c:{[null,"bob"]}:three')
    finally:
        await client.aclose()


async def test_a_conversation_keeps_its_instructions_and_newest_messages_within_its_bound(
    redis_url: str,
) -> None:
    """Past its byte bound a conversation loses its oldest messages after the leading
    system ones, the same in one process and in Redis (where two appends race), and a
    prompt shows a vision model only the newest images."""
    from engine import ChatMessage as EngineMessage
    from gateway.conversations import (
        Conversations,
        ConversationStore,
        bounded,
        message_bytes,
        newest_images,
    )
    from gateway.redisconversations import RedisConversations

    system = EngineMessage("system", "be brief")
    turns = [
        EngineMessage("user" if i % 2 == 0 else "assistant", f"{i:03d}" * 100) for i in range(40)
    ]
    each = message_bytes(turns[0])
    assert bounded([system, *turns], 10**9) == slice(1, 1)
    cut = bounded([system, *turns], message_bytes(system) + 10 * each)
    assert (cut.start, cut.stop) == (1, 31)  # thirty go, after the instructions
    assert bounded([turns[0]], 1) == slice(0, 0)  # the newest stays, whatever it weighs

    pic = [
        EngineMessage("user", f"look {i}", images=[bytes([i]) * 10, bytes([i]) * 20])
        for i in range(3)
    ]
    shown = newest_images([system, *pic, EngineMessage("assistant", "ok")], 3)
    assert [x.images for x in shown[1:4]] == [None, [b"\x01" * 20], pic[2].images]
    assert [x.content for x in shown[1:4]] == ["look 0", "look 1", "look 2"]

    # Redis measures a message as stored (MessagePack): a bound of about 10 of these.
    limit = 10 * (each + 8)
    local = ConversationStore(4, max_bytes=limit)
    shared = RedisConversations(redis_url, max_per_user=4, prefix="t7:", max_bytes=limit)
    stores: list[Conversations] = [local, shared]
    try:
        for store in stores:
            owner = (None, "carol")
            await store.history(owner, "long", "m")
            store.append(owner, "long", [system])
            for i in range(0, 40, 2):
                store.append(owner, "long", turns[i : i + 2])
            kept = (await store.history(owner, "long", "m")).messages
            assert kept[0] == system
            assert 8 <= len(kept) - 1 <= 11, len(kept)
            assert kept[1:] == turns[-(len(kept) - 1) :]  # the newest, in order
            assert sum(message_bytes(x) for x in kept[1:]) <= limit
    finally:
        await local.close()
        await shared.close()
