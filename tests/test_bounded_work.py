"""One request's work is bounded: conversation truncation in linear time, templates with
limits, and neither stalls the server for anyone else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.chat import render_chat
from engine.requests import ChatMessage
from engine.store.pull import ModelManager
from engine.store.store import ModelStore
from engine.truncation import droppable, estimated_cut, settle_cut
from gateway.config import LimitsConfig
from gateway.scopes import LOOPBACK_SCOPES
from gateway.server import RunningServer
from protocol import messages as m
from protocol.errors import BadRequest, TooLarge

from .gateway_helpers import client, gateway, server_config

# -- the pure decisions ------------------------------------------------------------------


def test_droppable_keeps_system_messages_and_the_last_turn() -> None:
    assert droppable(["system", "user", "assistant", "system", "user"]) == [1, 2]
    assert droppable(["user"]) == []


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17, 64])
@pytest.mark.parametrize("limit", [0, 3, 10, 40, 1000])
def test_settle_cut_finds_the_fewest_drops_whatever_the_estimate(n: int, limit: int) -> None:
    # A template that adds 2 tokens per message around each message's text.
    costs = [(i * 7) % 5 + 1 for i in range(n)]

    def size(k: int) -> int:
        return 3 + sum(c + 2 for c in costs[k:])

    calls: list[int] = []

    def fits(k: int) -> bool:
        calls.append(k)
        return size(k) <= limit

    want = next((k for k in range(n + 1) if fits(k)), n)
    calls.clear()
    start = estimated_cut(size(0), costs, limit)
    assert fits(start) or start == n  # the estimate never undercounts the drop needed
    for guess in {start, 0, n, n // 2}:
        calls.clear()
        assert settle_cut(guess, n, fits) == want
        assert len(calls) <= 2 * (n.bit_length() + 2) or guess != start


def test_settle_cut_gives_up_past_its_deadline() -> None:
    with pytest.raises(TooLarge):
        settle_cut(0, 10, lambda k: k > 5, deadline=time.perf_counter() - 1)


@pytest.mark.parametrize(
    "template",
    [
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "{% for m in messages %}{% for n in messages %}{% for o in messages %}"
        "{% endfor %}{% endfor %}{% endfor %}",
        '{{ "a" * 1000000000 }}',
        "{{ [1] * 100000000 }}",
        "{{ 10 ** 100000000 }}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        "{% for i in range(1000000000) %}{% endfor %}",
    ],
)
def test_hostile_templates_are_refused_quickly(template: str) -> None:
    with pytest.raises(BadRequest, match="template"):
        render_chat(template, [ChatMessage("user", "hi")] * 500)


def test_ordinary_templates_render_unchanged() -> None:
    t = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    msgs = [ChatMessage("user", "a"), ChatMessage("assistant", "b")]
    assert render_chat(t, msgs) == "<user>a<assistant>b"


# -- through a real server -----------------------------------------------------------------


@pytest.fixture
async def running(
    tmp_path: Path, script_model: Path, eos_model: Path
) -> AsyncIterator[RunningServer]:
    manager = ModelManager(ModelStore(tmp_path / "models"))
    await manager.create("stored", f"FROM {eos_model}\n")
    config = server_config(
        tmp_path,
        {"script": script_model, "eos": eos_model},
        limits=LimitsConfig(max_body_bytes=4 * 1024 * 1024),
    )
    async with gateway(config) as srv:
        yield srv


def _post(srv: RunningServer, path: str, body: Any, token: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(srv.http_url + path, json=body, headers=headers, timeout=120)


async def test_a_huge_conversation_is_truncated_while_others_are_served(
    running: RunningServer,
) -> None:
    token = running.gateway.auth.issue_token(sub="big", ttl=600)
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "w" * 2000}
        for i in range(511)
    ] + [{"role": "user", "content": "last"}]
    body = {"model": "eos", "messages": [{"role": "system", "content": "S"}, *turns]}
    big = asyncio.create_task(asyncio.to_thread(_post, running, "/v1/chat", body, token))
    # Another user's one-token request on the same worker completes.
    async with client(running, running.gateway.auth.issue_token(sub="small", ttl=600)) as c:
        await c.send(m.Generate("g1", "script", "hi", options=m.Options(max_tokens=1)))
        _, done, _ = await c.until_done("g1")
        assert done.finish_reason == "length"
    r = await big
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["text"] == "Done."
    # Only the newest messages fit a 512-token window; the system message stays.
    assert data["usage"]["prompt_tokens"] < 512


async def test_a_hostile_template_is_refused_and_the_loop_keeps_answering(
    running: RunningServer,
) -> None:
    token = running.gateway.auth.issue_token(sub="w", ttl=600, scopes=LOOPBACK_SCOPES)
    loops = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
    body = {"name": "slowtpl", "modelfile": f'FROM stored\nTEMPLATE """{loops}"""\n'}
    admin_create = asyncio.create_task(
        asyncio.to_thread(_post, running, "/v1/models/create", body, token)
    )
    answered_during = 0
    async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as h:
        while not admin_create.done():
            r = await h.get("/healthz")
            assert r.status_code == 200
            if not admin_create.done():
                answered_during += 1
    r = await admin_create
    assert r.status_code == 400 and "too expensive" in r.json()["error"]["message"]
    assert answered_during >= 1  # /healthz answered while the template was being checked
