"""The WebSocket gateway end to end: a real server, the real websockets client, tiny models."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.server import RunningServer
from protocol import messages as m
from protocol.errors import ErrorCode

from .conftest import SCRIPT
from .gateway_helpers import MSGPACK, client, gateway, server_config

ROOT = Path(__file__).resolve().parents[1]

GREEDY = m.Options(temperature=0.0, repeat_penalty=1.0)


async def http(url: str, **kw: object) -> bytes:
    """HTTP from a thread: the server runs on this test's event loop."""

    def fetch() -> bytes:
        req = urllib.request.Request(url, **kw)  # type: ignore[arg-type]
        with urllib.request.urlopen(req) as r:
            return bytes(r.read())

    return await asyncio.to_thread(fetch)


def opts(**kw: object) -> m.Options:
    return msgspec.structs.replace(GREEDY, **kw)


async def test_ready_then_generate_streams_deltas_in_order(
    server: RunningServer, token: str
) -> None:
    async with client(server, token, hello=False) as c:
        ready = await c.hello()
        assert ready.protocol == 1 and ready.user == "alice"
        assert {"script", "slow"} <= set(ready.models)
        await c.send(m.Generate("g1", "script", "x", opts(max_tokens=26), token_ids=True))
        started = await c.recv()
        assert isinstance(started, m.Started) and started.id == "g1"
        deltas, done, other = await c.until_done("g1")
        assert other == []
        assert [d.seq for d in deltas] == list(range(len(deltas)))
        assert "".join(d.text for d in deltas) == SCRIPT * 2
        assert sum(len(d.token_ids or []) for d in deltas) == 26
        assert done.finish_reason == "length" and done.usage.completion_tokens == 26
        assert done.timings.ttft_ms > 0


async def test_msgpack_subprotocol_over_binary_frames(server: RunningServer, token: str) -> None:
    async with client(server, token, subprotocol=m.SUBPROTOCOL_MSGPACK) as c:
        assert c.ws.subprotocol == m.SUBPROTOCOL_MSGPACK
        await c.send(m.Generate("g1", "script", "x", opts(max_tokens=13)))
        raw = await c.ws.recv()
        assert isinstance(raw, bytes)
        assert isinstance(MSGPACK.decode_server(raw), m.Started)
        deltas, _done, _ = await c.until_done("g1")
        assert "".join(d.text for d in deltas) == SCRIPT


async def test_chat_keeps_the_conversation_server_side(server: RunningServer, token: str) -> None:
    async with client(server, token) as c:
        await c.send(
            m.Chat("a", "script", [m.ChatMessage("user", "hello")], options=opts(max_tokens=13))
        )
        started = await c.recv()
        assert isinstance(started, m.Started) and started.conversation
        _, first, _ = await c.until_done("a")
        await c.send(
            m.Chat(
                "b",
                "script",
                [m.ChatMessage("user", "more")],
                started.conversation,
                opts(max_tokens=13),
            )
        )
        await c.recv()
        deltas, second, _ = await c.until_done("b")
        assert "".join(d.text for d in deltas) == SCRIPT
        # The second prompt holds the first turn and the answer too.
        assert second.usage.prompt_tokens > first.usage.prompt_tokens + 13
        assert second.conversation == started.conversation


async def test_cancel_ends_a_generation_and_the_engine_stops(
    server: RunningServer, token: str
) -> None:
    async with client(server, token) as c:
        await c.send(m.Generate("g1", "slow", "x", opts(max_tokens=3000)))
        assert isinstance(await c.recv(), m.Started)
        first = await c.recv()
        assert isinstance(first, m.Delta)
        await c.send(m.Cancel("g1"))
        _, done, _ = await c.until_done("g1")
        assert done.finish_reason == "cancelled"
        assert done.usage.completion_tokens < 3000
        health = await server.gateway.engine.health()
        assert sum(w.active for w in health.workers) == 0


async def test_disconnect_cancels_in_flight_generations(server: RunningServer, token: str) -> None:
    # The client stops reading and leaves: its close handshake is stuck behind the
    # deltas it will never read, so it gives up at once (close_timeout) and drops
    # the connection, as a crashed client would.
    async with client(server, token, close_timeout=0.1) as c:
        for i in range(2):
            await c.send(m.Generate(f"g{i}", "slow", "x", opts(max_tokens=3000)))
        while not isinstance(await c.recv(), m.Delta):
            pass
    engine = server.gateway.engine
    async with asyncio.timeout(15):
        while sum(w.active for w in (await engine.health()).workers):
            await asyncio.sleep(0.02)
    made = sum(w.tokens_generated for w in (await engine.health()).workers)
    await asyncio.sleep(0.2)
    assert sum(w.tokens_generated for w in (await engine.health()).workers) == made


async def test_credits_bound_what_is_in_flight(server: RunningServer, token: str) -> None:
    async with client(server, token, hello=False) as c:
        ready = await c.hello(credits=8)
        assert ready.flow_control
        await c.send(m.Generate("g1", "script", "x", opts(max_tokens=130)))
        assert isinstance(await c.recv(), m.Started)
        received = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                while True:
                    msg = await c.recv()
                    assert isinstance(msg, m.Delta)
                    received += len(msg.text.encode())
        # The server stopped within one delta of the 8 granted bytes.
        assert 8 <= received <= 8 + 4
        await c.send(m.Credit(10_000))
        _deltas, done, _ = await c.until_done("g1")
        assert done.finish_reason == "length" and done.usage.completion_tokens == 130
    metrics = (await http(server.http_url + "/metrics")).decode()
    assert "ferrous_backpressure_pauses_total 1.0" in metrics


async def test_generation_ids_conflict_and_unknown_cancels(
    server: RunningServer, token: str
) -> None:
    async with client(server, token) as c:
        await c.send(m.Generate("dup", "slow", "x", opts(max_tokens=2000)))
        await c.send(m.Generate("dup", "slow", "x", opts(max_tokens=5)))
        await c.send(m.Cancel("nope"))
        seen: dict[str, m.Error] = {}
        while len(seen) < 2:
            msg = await c.recv()
            if isinstance(msg, m.Error):
                seen[msg.code.value] = msg
        assert seen["conflict"].id == "dup"
        assert seen["not_found"].id == "nope"
        await c.send(m.Cancel("dup"))
        _, done, _ = await c.until_done("dup")
        assert done.finish_reason == "cancelled"


async def test_a_flood_beyond_the_session_limit_is_rate_limited(
    server: RunningServer, token: str
) -> None:
    async with client(server, token) as c:
        for i in range(6):
            await c.send(m.Generate(f"f{i}", "slow", "x", opts(max_tokens=200)))
        errors: list[m.Error] = []
        dones: list[m.Done] = []
        while len(dones) + len(errors) < 6:
            msg = await c.recv()
            if isinstance(msg, m.Error):
                errors.append(msg)
            elif isinstance(msg, m.Done):
                dones.append(msg)
        assert len(dones) == 3 and all(d.finish_reason == "length" for d in dones)
        assert [e.code for e in errors] == [ErrorCode.RATE_LIMITED] * 3
        assert all(e.retryable and e.retry_after == 1.0 for e in errors)
    # Counted with the other refusals (no tenant: the shared label).
    scraped = server.gateway.metrics.render().decode()
    assert 'ferrous_generation_refusals_total{model="",reason="rate_limited",tenant=""} 3.0' in (
        scraped
    )


@pytest.mark.parametrize(
    ("frame", "code", "needle"),
    [
        ("{not json", "bad_request", "malformed JSON"),
        ('{"type": "teleport"}', "bad_request", "$.type"),
        (
            '{"type": "generate", "id": "g", "model": "script", "prompt": "x", "options": {"max_tokens": "5"}}',
            "bad_request",
            "$.options.max_tokens",
        ),
        (
            '{"type": "generate", "id": "g", "model": "script", "prompt": 5}',
            "bad_request",
            "$.prompt",
        ),
        ('{"type": "cancel", "id": "g", "surprise": 1}', "bad_request", "surprise"),
        (b"\x81\xa4type\xa5hello", "bad_request", "binary frame"),
        (
            '{"type": "generate", "id": "g", "model": "nope", "prompt": "x"}',
            "model_not_found",
            "nope",
        ),
        ("x" * 5000, "too_large", "exceeds"),
    ],
)
async def test_bad_frames_get_typed_errors_and_the_connection_stays_usable(
    server: RunningServer, token: str, frame: str | bytes, code: str, needle: str
) -> None:
    async with client(server, token) as c:
        await c.send_raw(frame)
        while True:
            msg = await c.recv()
            if isinstance(msg, m.Error):
                break
        assert msg.code.value == code
        assert needle in msg.message
        await c.send(m.Generate("ok", "script", "x", opts(max_tokens=2)))
        deltas, done, _ = await c.until_done("ok")
        assert "".join(d.text for d in deltas) == "Hi" and done.finish_reason == "length"


async def test_text_frames_on_the_msgpack_subprotocol_are_refused(
    server: RunningServer, token: str
) -> None:
    async with client(server, token, subprotocol=m.SUBPROTOCOL_MSGPACK, hello=False) as c:
        await c.send_raw('{"type": "hello"}')
        msg = await c.recv()
        assert isinstance(msg, m.Error) and "text frame" in msg.message
        await c.hello()


async def test_messages_before_hello_are_refused(server: RunningServer, token: str) -> None:
    async with client(server, token, hello=False) as c:
        await c.send(m.Generate("g", "script", "x"))
        msg = await c.recv()
        assert (
            isinstance(msg, m.Error)
            and msg.code == ErrorCode.BAD_REQUEST
            and "hello" in msg.message
        )
        await c.hello()
        await c.send(m.Heartbeat(1.0))
        assert isinstance(await c.recv(), m.ServerHeartbeat)


async def test_users_cannot_touch_each_others_generations_or_conversations(
    server: RunningServer, token: str
) -> None:
    bob = server.gateway.auth.issue_token(sub="bob", ttl=600)
    async with client(server, token) as alice_c, client(server, bob) as bob_c:
        await alice_c.send(
            m.Chat(
                "a1",
                "script",
                [m.ChatMessage("user", "secret plans")],
                "shared-id",
                opts(max_tokens=13),
            )
        )
        await alice_c.until_done("a1")
        await alice_c.send(m.Generate("long", "slow", "x", opts(max_tokens=3000)))
        # Bob cannot cancel Alice's generation, even knowing its id...
        await bob_c.send(m.Cancel("long"))
        err = await bob_c.recv()
        assert isinstance(err, m.Error) and err.code == ErrorCode.NOT_FOUND
        # ...and the same conversation id is a different, empty conversation for him.
        await bob_c.send(
            m.Chat("b1", "script", [m.ChatMessage("user", "hi")], "shared-id", opts(max_tokens=1))
        )
        _, bob_done, _ = await bob_c.until_done("b1")
        await alice_c.send(
            m.Chat("a2", "script", [m.ChatMessage("user", "hi")], "shared-id", opts(max_tokens=1))
        )
        _, alice_done, _ = await alice_c.until_done("a2")
        assert bob_done.usage.prompt_tokens < alice_done.usage.prompt_tokens
        await alice_c.send(m.Cancel("long"))
        _, done, _ = await alice_c.until_done("long")
        assert done.finish_reason == "cancelled"


async def test_a_token_that_expires_mid_session_closes_it(server: RunningServer) -> None:
    short = server.gateway.auth.issue_token(sub="alice", ttl=1.0)
    async with client(server, short) as c:
        await c.send(m.Generate("g", "slow", "x", opts(max_tokens=100_000)))
        got_error = None
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                msg = await c.recv()
                if isinstance(msg, m.Error):
                    got_error = msg
        assert got_error is not None and got_error.code == ErrorCode.UNAUTHORIZED
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_healthz_and_metrics(server: RunningServer, token: str) -> None:
    async with client(server, token) as c:
        await c.send(m.Generate("g", "script", "x", opts(max_tokens=5)))
        await c.until_done("g")
        await c.send(m.Cancel("missing"))
        await c.recv()
        health = await http(server.http_url + "/healthz")
        assert b'"ok"' in health
        text = (await http(server.http_url + "/metrics")).decode()
    for name in (
        "ferrous_time_to_first_token_seconds_bucket",
        "ferrous_inter_token_latency_seconds_bucket",
        "ferrous_tokens_generated_total",
        "ferrous_active_sessions",
        "ferrous_active_generations",
        'ferrous_errors_total{code="not_found"} 1.0',
        "ferrous_backpressure_pauses_total",
        # The gateway's own process, and each worker's.
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        'ferrous_worker_cpu_seconds_total{worker="0"}',
        'ferrous_worker_resident_memory_bytes{worker="0"}',
    ):
        assert name in text, name
    # Per model: its tokens, latencies, how its generations ended, what it holds.
    assert 'ferrous_tokens_generated_total{model="script"} 5.0' in text
    assert 'ferrous_time_to_first_token_seconds_count{model="script"} 1.0' in text
    assert (
        'ferrous_generations_finished_total{model="script",reason="length",tenant=""} 1.0' in text
    )
    assert "ferrous_models_loaded " in text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("ferrous_model_memory_bytes{", "ferrous_model_load_seconds{"))
    }
    assert samples['ferrous_model_memory_bytes{backend="llama_cpp",model="script"}'] > 0
    assert samples['ferrous_model_load_seconds{model="script"}'] > 0
    # The dashboard under deploy/ plots only series this server exports.
    dashboard = json.loads((ROOT / "deploy/grafana/ferrousforge.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = set(re.findall(r"\b((?:ferrous|process)_[a-z_]+)", " ".join(exprs)))
    exported = set()
    for line in text.splitlines():  # "# TYPE name kind": what the series are called
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
            exported.update(name + x for x in ["", *suffixes.get(kind, [])])
    assert len(names) >= 15 and names <= exported, names - exported


async def test_token_in_subprotocol_and_single_use_tickets(
    server: RunningServer, token: str
) -> None:
    # Browsers: the token rides in Sec-WebSocket-Protocol and is never echoed back.
    async with connect(
        server.ws_url, subprotocols=[m.SUBPROTOCOL_JSON, m.TOKEN_SUBPROTOCOL_PREFIX + token]
    ) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == m.SUBPROTOCOL_JSON
    body = await http(
        server.http_url + "/v1/tickets", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    ticket = msgspec.json.decode(body)["ticket"]
    async with connect(f"{server.ws_url}?ticket={ticket}", subprotocols=[m.SUBPROTOCOL_JSON]) as ws:  # type: ignore[list-item]
        await ws.send('{"type": "hello"}')
        assert '"ready"' in str(await ws.recv())
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{server.ws_url}?ticket={ticket}", subprotocols=[m.SUBPROTOCOL_JSON]):  # type: ignore[list-item]
            pass
    assert info.value.response.status_code == 401


async def test_api_keys_authenticate_like_tokens(server: RunningServer) -> None:
    key = server.gateway.auth.api_keys.create("carol")
    async with connect(
        server.ws_url, subprotocols=[m.SUBPROTOCOL_JSON], additional_headers={"X-API-Key": key}
    ) as ws:  # type: ignore[list-item]
        await ws.send('{"type": "hello"}')
        assert '"user":"carol"' in str(await ws.recv())


async def test_every_log_record_of_a_request_carries_session_and_request_ids(
    server: RunningServer, token: str
) -> None:
    import io
    import json
    import logging

    from gateway.logs import configure_logging

    root, ours = logging.getLogger(), logging.getLogger("ferrous")
    saved = (root.handlers[:], root.level, ours.level, ours.propagate)
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        async with client(server, token) as c:
            await c.send(m.Generate("logged-1", "script", "x", opts(max_tokens=3)))
            await c.until_done("logged-1")
            await c.send(m.Generate("logged-2", "nope", "x"))
            await c.recv()
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        ours.setLevel(saved[2])
        ours.propagate = saved[3]
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [r for r in records if r.get("request") in ("logged-1", "logged-2")]
    assert {r["request"] for r in mine} == {"logged-1", "logged-2"}
    assert any("generation ended: length" in r["message"] for r in mine)
    assert any("model_not_found" in r["message"] for r in mine)
    assert all(r["session"] and r["session"].startswith("s-") for r in mine)
    opened = [r for r in records if r["message"].startswith("session opened")]
    assert opened and opened[0]["session"] == mine[0]["session"]


async def test_a_cancel_right_behind_its_generate_still_ends_with_done(
    server: RunningServer, token: str
) -> None:
    async with client(server, token) as c:
        for i in range(5):
            await c.ws.send(
                c.codec.encode(m.Generate(f"quick{i}", "slow", "x", opts(max_tokens=3000)))
            )
            await c.ws.send(c.codec.encode(m.Cancel(f"quick{i}")))
            _, done, other = await c.until_done(f"quick{i}")
            assert done.finish_reason == "cancelled"
            assert not [x for x in other if isinstance(x, m.Error)]
        # Nothing keeps running, and the session is usable.
        await c.send(m.Generate("after", "script", "x", opts(max_tokens=2)))
        _, done, _ = await c.until_done("after")
        assert done.finish_reason == "length"


async def test_overlapping_turns_of_one_conversation_keep_their_own_messages(
    tmp_path: Path, slow_model: Path
) -> None:
    """Two turns of one conversation wait behind another chat for the only slot; the
    first fails when it starts (its message does not fit the context), the second is
    answered. The conversation keeps the second turn, question and answer, and nothing
    of the failed one."""
    config = server_config(tmp_path, {"slow": slow_model}, seqs_per_worker=1)
    async with gateway(config) as srv:
        token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
        async with client(srv, token) as c:
            await c.send(
                m.Chat("x", "slow", [m.ChatMessage("user", "hold")], None, opts(max_tokens=100_000))
            )
            while not isinstance(await c.recv(), m.Delta):
                pass
            huge = "word " * 20_000  # far beyond the 4096-token context
            await c.send(
                m.Chat("a", "slow", [m.ChatMessage("user", huge)], "c1", opts(max_tokens=4))
            )
            await c.send(
                m.Chat("b", "slow", [m.ChatMessage("user", "short one")], "c1", opts(max_tokens=4))
            )
            while srv.gateway.engine.queued("slow") < 2:
                await asyncio.sleep(0.01)
            await c.send(m.Cancel("x"))
            ended: dict[str, object] = {}
            while len(ended) < 3:
                msg = await c.recv()
                if isinstance(msg, (m.Done, m.Error)) and msg.id in ("x", "a", "b"):
                    ended.setdefault(msg.id, msg)
            assert isinstance(ended["a"], m.Error)
            assert isinstance(ended["b"], m.Done) and ended["b"].finish_reason == "length"
        owner = (None, "alice")
        conv = srv.gateway.conversations.get_or_create(owner, "c1", "slow")
        assert [x.role for x in conv.messages] == ["user", "assistant"]
        assert conv.messages[0].content == "short one"
