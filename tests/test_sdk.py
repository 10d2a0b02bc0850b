"""The Python SDK (``ferrous_client``) against a real server on a loopback port."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
from ferrous_client import (
    Backoff,
    ConnectionLost,
    FerrousClient,
    FerrousClientError,
    ModelNotFound,
    NotFound,
    Overloaded,
    RateLimited,
    SyncFerrousClient,
    TooLarge,
    Unauthorized,
)
from ferrous_client import BadRequest as ClientBadRequest
from ferrous_client.errors import error_from_code
from ferrous_client.protocol.errors import ErrorCode

from gateway.config import AuthConfig, LimitsConfig
from gateway.server import RunningServer

from .conftest import SCRIPT
from .gateway_helpers import gateway, server_config

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}


def opts(**kw: object) -> dict[str, object]:
    return {**GREEDY, **kw}


async def active_generations(server: RunningServer) -> int:
    return sum(w.active for w in (await server.gateway.engine.health()).workers)


async def until_idle(server: RunningServer, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while await active_generations(server):
            await asyncio.sleep(0.02)


async def metrics(server: RunningServer) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(server.http_url + "/metrics") as r:
            return bytes(r.read()).decode()

    return await asyncio.to_thread(fetch)


async def test_chat_streams_the_script_and_reports_usage_and_timings(
    server: RunningServer, token: str
) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        assert client.ready.user == "alice"
        assert {"script", "slow"} <= set(client.ready.models)
        gen = client.chat(
            "script", [{"role": "user", "content": "hello"}], options=opts(max_tokens=13)
        )
        deltas = [d async for d in gen]
        assert "".join(d.text for d in deltas) == SCRIPT
        assert [d.seq for d in deltas] == list(range(len(deltas)))
        assert gen.done is not None and gen.done.finish_reason == "length"
        assert gen.usage is not None and gen.usage.completion_tokens == 13
        assert gen.timings is not None and gen.timings.ttft_ms > 0
        assert gen.conversation and gen.started is not None


async def test_a_conversation_continues_with_its_id(server: RunningServer, token: str) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        first = client.chat("script", "hello", options=opts(max_tokens=13))
        assert await first.collect() == SCRIPT
        second = client.chat(
            "script", "more", conversation=first.conversation, options=opts(max_tokens=13)
        )
        assert await second.collect() == SCRIPT
        assert first.usage is not None and second.usage is not None
        # The second prompt holds the first turn and its answer.
        assert second.usage.prompt_tokens > first.usage.prompt_tokens + 13
        assert second.conversation == first.conversation


async def test_two_generations_share_one_connection(server: RunningServer, token: str) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        a = client.generate("slow", "x", options=opts(max_tokens=39))
        b = client.generate("script", "y", options=opts(max_tokens=26))
        text_a, text_b = await asyncio.gather(a.collect(), b.collect())
        assert text_a == SCRIPT * 3 and text_b == SCRIPT * 2
        assert a.usage is not None and a.usage.completion_tokens == 39
        assert b.usage is not None and b.usage.completion_tokens == 26
        assert len(server.gateway.sessions) == 1


async def test_leaving_the_loop_early_cancels_the_generation(
    server: RunningServer, token: str
) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        gen = client.generate("slow", "x", options=opts(max_tokens=3000))
        async for _delta in gen:
            break
        await until_idle(server)
        async with asyncio.timeout(5):  # the done may come just after the engine stopped
            while not gen.finished:
                await asyncio.sleep(0.01)
        assert gen.done is not None and gen.done.finish_reason == "cancelled"
        # The connection goes on; what the cancelled one still sent was dropped.
        assert await client.generate("script", "x", options=opts(max_tokens=13)).collect() == (
            SCRIPT
        )


async def test_an_exception_in_the_loop_cancels_the_generation(
    server: RunningServer, token: str
) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        with pytest.raises(KeyError):
            async with client.generate("slow", "x", options=opts(max_tokens=3000)) as gen:
                async for _delta in gen:
                    raise KeyError("the application failed")
        await until_idle(server)


async def test_anext_then_aclose_cancels(server: RunningServer, token: str) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        gen = client.generate("slow", "x", options=opts(max_tokens=3000))
        first = await anext(gen)
        assert first.seq == 0 and first.text
        await gen.aclose()
        await until_idle(server)


@pytest.mark.parametrize("via", ["generation", "client"])
async def test_cancel_ends_with_finish_reason_cancelled(
    server: RunningServer, token: str, via: str
) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        gen = client.generate("slow", "x", options=opts(max_tokens=3000))
        received = 0
        async for _delta in gen:
            received += 1
            if received == 1:
                if via == "generation":
                    await gen.cancel()
                else:
                    assert await client.cancel(gen.id)
        assert gen.done is not None and gen.done.finish_reason == "cancelled"
        assert received < 3000
        assert await active_generations(server) == 0
        assert not await client.cancel(gen.id)


async def test_unknown_model_raises_model_not_found(server: RunningServer, token: str) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        gen = client.generate("no-such-model", "x")
        with pytest.raises(ModelNotFound) as info:
            await gen.collect()
        assert info.value.generation_id == gen.id and "no-such-model" in info.value.message
        assert gen.finished and gen.done is None
        assert await client.generate("script", "x", options=opts(max_tokens=2)).collect() == "Hi"


@pytest.mark.parametrize("credential", [{"token": "not-a-jwt"}, {"api_key": "nope"}, {}])
async def test_a_refused_credential_raises_unauthorized_at_connect(
    server: RunningServer, credential: dict[str, Any]
) -> None:
    with pytest.raises(Unauthorized) as info:
        async with FerrousClient(server.ws_url, **credential):
            pass
    assert not info.value.retryable and info.value.message


async def test_api_keys_authenticate(server: RunningServer) -> None:
    key = server.gateway.auth.api_keys.create("carol")
    async with FerrousClient(server.ws_url, api_key=key) as client:
        assert client.ready.user == "carol"


async def test_msgpack_subprotocol(server: RunningServer, token: str) -> None:
    async with FerrousClient(server.ws_url, token=token, subprotocol="msgpack") as client:
        assert client.subprotocol == "ferrous.v1.msgpack"
        gen = client.chat("script", "hello", options=opts(max_tokens=26))
        assert await gen.collect() == SCRIPT * 2
        assert gen.usage is not None and gen.usage.completion_tokens == 26


async def test_credits_stream_a_long_generation_and_pause_the_server(
    server: RunningServer, token: str
) -> None:
    async with FerrousClient(server.ws_url, token=token, credits=16) as client:
        assert client.ready.flow_control
        gen = client.generate("script", "x", options=opts(max_tokens=520))
        parts: list[str] = []
        async for delta in gen:
            if not parts:
                await asyncio.sleep(0.3)  # a slow reader: the server must wait for credit
            parts.append(delta.text)
        assert "".join(parts) == SCRIPT * 40
        assert gen.done is not None and gen.done.finish_reason == "length"
    text = await metrics(server)
    pauses = next(
        line for line in text.splitlines() if line.startswith("ferrous_backpressure_pauses_total")
    )
    assert float(pauses.split()[1]) >= 1


async def test_credits_do_not_deadlock_when_generations_are_read_one_after_another(
    server: RunningServer, token: str
) -> None:
    async with FerrousClient(server.ws_url, token=token, credits=8) as client:
        a = client.generate("script", "x", options=opts(max_tokens=130))
        b = client.generate("script", "y", options=opts(max_tokens=130))
        async with asyncio.timeout(20):
            assert await b.collect() == SCRIPT * 10
            assert await a.collect() == SCRIPT * 10


async def test_errors_without_a_generation_go_to_on_error(
    server: RunningServer, token: str
) -> None:
    seen: list[FerrousClientError] = []
    async with FerrousClient(server.ws_url, token=token, on_error=seen.append) as client:
        await client.forget("never-was")
        async with asyncio.timeout(5):
            while not seen:
                await asyncio.sleep(0.01)
    assert isinstance(seen[0], NotFound) and seen[0].generation_id is None


async def test_bad_requests_are_refused_before_they_are_sent(
    server: RunningServer, token: str
) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        with pytest.raises(ClientBadRequest, match="max_tokens"):
            client.generate("script", "x", options={"max_tokens": 0})
        with pytest.raises(ClientBadRequest, match="role"):
            client.chat("script", [{"role": "wizard", "content": "hi"}])
        with pytest.raises(TooLarge):
            client.generate("script", "x" * 5000)
        assert await client.generate("script", "x", options=opts(max_tokens=2)).collect() == "Hi"


async def test_the_session_limit_raises_rate_limited_for_the_extra_generation(
    server: RunningServer, token: str
) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        gens = [client.generate("slow", "x", options=opts(max_tokens=200)) for _ in range(4)]
        results = await asyncio.gather(*(g.collect() for g in gens), return_exceptions=True)
        limited = [r for r in results if isinstance(r, RateLimited)]
        assert len(limited) == 1 and limited[0].retryable
        assert sum(isinstance(r, str) for r in results) == 3


async def test_a_lost_connection_ends_running_generations(server: RunningServer) -> None:
    short = server.gateway.auth.issue_token(sub="alice", ttl=1.0)
    seen: list[FerrousClientError] = []
    async with FerrousClient(server.ws_url, token=short, on_error=seen.append) as client:
        gen = client.generate("slow", "x", options=opts(max_tokens=100_000))
        with pytest.raises(ConnectionLost) as info:
            async for _delta in gen:
                pass
        assert info.value.close_code == 1008 and info.value.generation_id == gen.id
        assert isinstance(info.value.__cause__, Unauthorized)
        assert [type(e) for e in seen] == [Unauthorized]
        with pytest.raises(ConnectionLost):
            client.generate("script", "x")


async def test_sync_client_streams_the_script(server: RunningServer, token: str) -> None:
    def run() -> tuple[str, str | None, str, str]:
        with SyncFerrousClient(server.ws_url, token=token) as client:
            gen = client.chat("script", "hello", options=opts(max_tokens=13))
            text = "".join(d.text for d in gen)
            # Leaving early cancels; the next generation is not confused by its leftovers.
            for _delta in client.generate("slow", "x", options=opts(max_tokens=3000)):
                break
            after = client.generate("script", "x", options=opts(max_tokens=13)).collect()
            again = client.chat(
                "script", "more", conversation=gen.conversation, options=opts(max_tokens=13)
            )
            return text, gen.finish_reason, after, again.collect()

    text, reason, after, again = await asyncio.to_thread(run)
    assert text == SCRIPT and reason == "length"
    assert after == SCRIPT and again == SCRIPT
    await until_idle(server)


async def test_sync_client_errors(server: RunningServer, token: str) -> None:
    def unknown_model() -> None:
        with SyncFerrousClient(server.ws_url, token=token, subprotocol="msgpack") as client:
            client.generate("no-such-model", "x").collect()

    def refused() -> None:
        with SyncFerrousClient(server.ws_url, token="bogus"):
            pass

    def explicit_cancel() -> str | None:
        with SyncFerrousClient(server.ws_url, token=token, credits=64) as client:
            gen = client.generate("slow", "x", options=opts(max_tokens=3000))
            for _delta in gen:
                gen.cancel()
            return gen.finish_reason

    with pytest.raises(ModelNotFound):
        await asyncio.to_thread(unknown_model)
    with pytest.raises(Unauthorized):
        await asyncio.to_thread(refused)
    assert await asyncio.to_thread(explicit_cancel) == "cancelled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_connect_with_retry_waits_for_the_server(
    tmp_path: Path, script_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    config = msgspec.structs.replace(
        server_config(tmp_path, {"script": script_model}, auth=AuthConfig(enabled=False)),
        port=port,
    )
    stop = asyncio.Event()

    async def serve_later() -> None:
        await asyncio.sleep(0.5)
        async with gateway(config):
            await stop.wait()

    server_task = asyncio.create_task(serve_later())
    try:
        with caplog.at_level(logging.INFO, logger="ferrous_client"):
            client = await FerrousClient.connect_with_retry(
                f"ws://127.0.0.1:{port}/v1/ws",
                backoff=Backoff(attempts=40, initial=0.1, maximum=0.5),
            )
        async with client:
            gen = client.generate("script", "x", options=opts(max_tokens=13))
            assert await gen.collect() == SCRIPT
        assert [r for r in caplog.records if "cannot open a session" in r.getMessage()]
    finally:
        stop.set()
        await server_task


async def test_retries_end_with_connection_lost_on_a_refused_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"ws://127.0.0.1:{free_port()}/v1/ws"
    with caplog.at_level(logging.INFO, logger="ferrous_client"), pytest.raises(ConnectionLost):
        await FerrousClient.connect_with_retry(
            url, attempts=3, backoff=Backoff(initial=0.01, maximum=0.02)
        )
    retries = [r for r in caplog.records if "cannot open a session" in r.getMessage()]
    assert len(retries) == 2


async def test_a_refused_credential_is_not_retried(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ferrous_client"), pytest.raises(Unauthorized):
        await FerrousClient.connect_with_retry(server.ws_url, token="bogus", attempts=5)
    assert not [r for r in caplog.records if "cannot open a session" in r.getMessage()]


async def test_an_overloaded_server_is_retried_until_a_session_frees_up(
    tmp_path: Path, script_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = server_config(tmp_path, {"script": script_model}, limits=LimitsConfig(max_sessions=1))
    async with gateway(config) as server:
        token = server.gateway.auth.issue_token(sub="alice", ttl=600)
        first = await FerrousClient(server.ws_url, token=token).connect()
        with pytest.raises(Overloaded) as info:
            await FerrousClient.connect_with_retry(
                server.ws_url, token=token, attempts=2, backoff=Backoff(initial=0.01)
            )
        assert info.value.retryable and "too many sessions" in info.value.message
        with caplog.at_level(logging.INFO, logger="ferrous_client"):
            second = asyncio.create_task(
                FerrousClient.connect_with_retry(
                    server.ws_url,
                    token=token,
                    backoff=Backoff(attempts=50, initial=0.05, maximum=0.1),
                )
            )
            await asyncio.sleep(0.3)
            await first.close()
            async with await second as client:
                assert client.ready.user == "alice"
        assert [r for r in caplog.records if "overloaded" in r.getMessage().lower()]


async def test_reconnect_continues_a_conversation(server: RunningServer, token: str) -> None:
    async with FerrousClient(server.ws_url, token=token) as client:
        first = client.chat("script", "hello", options=opts(max_tokens=13))
        await first.collect()
        session = client.ready.session
        await client.reconnect()
        assert client.ready.session != session
        second = client.chat(
            "script", "more", conversation=first.conversation, options=opts(max_tokens=13)
        )
        assert await second.collect() == SCRIPT
        assert first.usage is not None and second.usage is not None
        assert second.usage.prompt_tokens > first.usage.prompt_tokens + 13


def test_every_error_code_has_its_exception_class() -> None:
    for code in ErrorCode:
        err = error_from_code(code.value, "m", generation_id="g")
        assert err.code == code and err.generation_id == "g"
        assert type(err).__name__ != "FerrousClientError"
    assert isinstance(error_from_code("from_the_future", "m"), FerrousClientError)
