"""Native HTTP generation (JSON and SSE), readiness, errors and disconnects, on a real server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.requests import ErrorInfo, FinishReason, GenerationDone, Timings, Usage
from gateway.config import LimitsConfig
from gateway.generation import raise_if_failed
from gateway.http_common import http_status
from gateway.scopes import ALL_SCOPES
from gateway.server import RunningServer
from protocol.errors import FerrousError

from .conftest import SCRIPT
from .gateway_helpers import gateway, server_config


@pytest.fixture
async def running(
    tmp_path: Path, script_model: Path, eos_model: Path, slow_model: Path
) -> AsyncIterator[RunningServer]:
    config = server_config(
        tmp_path,
        {"script": script_model, "eos": eos_model, "slow": slow_model},
        limits=LimitsConfig(max_body_bytes=32 * 1024),
    )
    async with gateway(config) as srv:
        yield srv


def _headers(srv: RunningServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.gateway.auth.issue_token(sub='alice', ttl=600)}"}


async def post(srv: RunningServer, path: str, body: Any, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=srv.http_url, headers=_headers(srv)) as c:
        return await c.post(path, json=body, **kw)


async def sse(srv: RunningServer, path: str, body: Any) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    async with (
        httpx.AsyncClient(base_url=srv.http_url, headers=_headers(srv)) as c,
        c.stream("POST", path, json=body) as r,
    ):
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        event = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    return events


GREEDY = {"temperature": 0, "max_tokens": 13}


async def test_generate_returns_json(running: RunningServer) -> None:
    r = await post(running, "/v1/generate", {"model": "script", "prompt": "x", "options": GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == SCRIPT and body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 13 and body["model"] == "script"
    assert body["timings"]["ttft_ms"] > 0 and body["id"]


async def test_chat_streams_the_websocket_events(running: RunningServer) -> None:
    events = await sse(
        running,
        "/v1/chat",
        {"model": "eos", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    kinds = [k for k, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    deltas = [d for k, d in events if k == "delta"]
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    assert "".join(d["text"] for d in deltas) == "Done."
    assert events[-1][1]["type"] == "done" and events[-1][1]["finish_reason"] == "stop"
    assert {d["id"] for _, d in events} == {events[0][1]["id"]}


async def test_chat_conversations_are_kept_when_named(running: RunningServer) -> None:
    turn = {"model": "eos", "conversation": "c-http-1", "options": {"temperature": 0}}
    first = await post(
        running, "/v1/chat", {**turn, "messages": [{"role": "user", "content": "a"}]}
    )
    second = await post(
        running, "/v1/chat", {**turn, "messages": [{"role": "user", "content": "b"}]}
    )
    assert first.json()["conversation"] == "c-http-1"
    # The second prompt holds the first turn and its answer.
    assert second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"] + 4
    stateless = await post(
        running, "/v1/chat", {"model": "eos", "messages": [{"role": "user", "content": "b"}]}
    )
    assert stateless.json()["usage"]["prompt_tokens"] == first.json()["usage"]["prompt_tokens"]


async def test_bad_requests_name_the_field(running: RunningServer) -> None:
    cases: list[tuple[Any, int, str]] = [
        ({"model": "script"}, 400, "prompt"),
        ({"model": "script", "prompt": "x", "optoins": {}}, 400, "optoins"),
        (
            {"model": "script", "prompt": "x", "options": {"temperature": "hot"}},
            400,
            "$.options.temperature",
        ),
        (
            {"model": "script", "prompt": "x", "options": {"max_tokens": -1}},
            400,
            "$.options.max_tokens",
        ),
        ({"model": "script", "prompt": "x", "keep_alive": "later"}, 400, "keep_alive"),
        ({"model": "script", "prompt": "x", "format": "yaml"}, 400, "format"),
        ({"model": "nope", "prompt": "x"}, 404, "nope"),
        ({"model": "script", "prompt": "x" * 40_000}, 413, "limit"),
        ([1, 2], 400, "object"),
    ]
    for body, status, words in cases:
        r = await post(running, "/v1/generate", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert words in err["message"], (body, err)
        assert err["code"] in ("bad_request", "model_not_found", "too_large")
    async with httpx.AsyncClient(base_url=running.http_url, headers=_headers(running)) as c:
        r = await c.post("/v1/generate", content=b"{nope")
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = await c.post("/v1/generate", content=b"")
        assert r.status_code == 400
    async with httpx.AsyncClient(base_url=running.http_url) as c:
        r = await c.post("/v1/generate", json={"model": "script", "prompt": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


async def test_readyz_and_healthz(running: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=running.http_url) as c:
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready"}  # no details unasked
        admin = running.gateway.auth.issue_token(sub="root", ttl=60, scopes=ALL_SCOPES)
        r = await c.get("/readyz", headers={"Authorization": f"Bearer {admin}"})
        (worker,) = r.json()["workers"]
        assert worker["alive"] is True and isinstance(worker["tokens_read_ahead"], int)
        assert (await c.get("/healthz")).json()["status"] == "ok"


async def _worker_tokens(srv: RunningServer) -> int:
    return sum(w.tokens_generated for w in (await srv.gateway.engine.health()).workers)


async def _settles(srv: RunningServer) -> int:
    """Wait until no generation runs, then check the token count stays put."""
    deadline = time.monotonic() + 10
    while sum(w.active for w in (await srv.gateway.engine.health()).workers):
        assert time.monotonic() < deadline, "the generation kept running"
        await asyncio.sleep(0.05)
    before = await _worker_tokens(srv)
    await asyncio.sleep(0.3)
    assert await _worker_tokens(srv) == before
    return before


async def test_a_client_that_leaves_cancels_its_generation(running: RunningServer) -> None:
    # The slow model would fill its 4096-token context: far more than is made before the cut.
    long = {"model": "slow", "prompt": "x", "options": {"temperature": 0}, "stream": True}
    async with (
        httpx.AsyncClient(base_url=running.http_url, headers=_headers(running)) as c,
        c.stream("POST", "/v1/generate", json=long) as r,
    ):
        n = 0
        async for line in r.aiter_lines():
            n += line.startswith("event: delta")
            if n == 5:
                break
    after_stream = await _settles(running)
    assert after_stream < 1000

    long["stream"] = False
    async with httpx.AsyncClient(base_url=running.http_url, headers=_headers(running)) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/generate", json=long, timeout=0.5)
    assert await _settles(running) - after_stream < 1000


async def test_overload_is_a_503_on_every_surface(running: RunningServer) -> None:
    """While draining, new generations are refused with each surface's 503."""
    running.gateway.draining = True
    try:
        native = await post(running, "/v1/generate", {"model": "script", "prompt": "x"})
        ollama = await post(running, "/api/generate", {"model": "script", "prompt": "x"})
        openai = await post(
            running,
            "/v1/chat/completions",
            {"model": "script", "messages": [{"role": "user", "content": "x"}]},
        )
        # Embeddings too, on both compatible surfaces.
        embeds = [
            await post(running, "/api/embed", {"model": "script", "input": "x"}),
            await post(running, "/api/embeddings", {"model": "script", "prompt": "x"}),
            await post(running, "/v1/embeddings", {"model": "script", "input": "x"}),
        ]
    finally:
        running.gateway.draining = False
    assert [r.status_code for r in embeds] == [503, 503, 503]
    assert native.status_code == ollama.status_code == openai.status_code == 503
    assert native.json()["error"]["code"] == "overloaded"
    assert native.json()["error"]["retryable"] is True
    assert "shutting down" in ollama.json()["error"]
    assert openai.json()["error"]["type"] == "server_error"
    assert openai.json()["error"]["code"] == "overloaded"


def test_every_surface_reports_an_ending_the_same_way() -> None:
    """One mapping from how a generation ended to the error its whole answer reports
    (gateway.generation.raise_if_failed): stalled is a 504 everywhere, cancelled a 499,
    an unexplained failure a 500; stop and length are answers."""
    usage, timings = Usage(1, 1), Timings(0, 0, 0, 0, 0)

    def ended(reason: FinishReason, error: ErrorInfo | None = None) -> int:
        try:
            raise_if_failed(GenerationDone("r", reason, usage, timings, error))
        except FerrousError as exc:
            return http_status(exc)
        return 200

    assert ended(FinishReason.STOP) == ended(FinishReason.LENGTH) == 200
    assert ended(FinishReason.STALLED) == 504
    assert ended(FinishReason.CANCELLED) == 499
    assert ended(FinishReason.ERROR) == 500
    too_long = ErrorInfo("too_large", "the prompt does not fit", False)
    assert ended(FinishReason.ERROR, too_long) == 413
