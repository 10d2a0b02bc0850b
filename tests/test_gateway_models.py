"""Stored models through a real gateway: WS pulls, Modelfile defaults, keep_alive, HTTP routes."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.store.pull import ModelManager
from engine.store.store import ModelStore
from gateway.config import SourcesConfig
from gateway.scopes import LOOPBACK_SCOPES
from gateway.server import RunningServer
from protocol import messages as m

from .fileserver import serve_payload
from .gateway_helpers import client, gateway, server_config

MODELFILE = '''
FROM ./okay.gguf
PARAMETER temperature 0
PARAMETER num_ctx 256
SYSTEM """Be brief."""
MESSAGE user "Ping?"
MESSAGE assistant "Pong."
'''


@pytest.fixture
async def running(tmp_path: Path, okay_model: Path) -> AsyncIterator[RunningServer]:
    """A gateway whose store holds "okay" (imported) and "brief" (from a Modelfile)."""
    manager = ModelManager(ModelStore(tmp_path / "models"))
    (tmp_path / "okay.gguf").write_bytes(okay_model.read_bytes())
    await manager.pull(str(tmp_path / "okay.gguf"))
    await manager.create("brief", MODELFILE, base_dir=tmp_path)
    # The tests' file server is plain HTTP on loopback: allowed here, not by default.
    sources = SourcesConfig(
        schemes=["https", "http", "hf", "pypi", "tiny"], allow_hosts=["127.0.0.1"]
    )
    async with gateway(server_config(tmp_path, {}, sources=sources)) as srv:
        yield srv


def _token(srv: RunningServer) -> str:
    """A user who manages the shared store (no tenant): pull, create, copy, delete."""
    return srv.gateway.auth.issue_token(sub="alice", ttl=600, scopes=LOOPBACK_SCOPES)


async def _http(
    srv: RunningServer, method: str, path: str, body: Any = None, token: str | None = ""
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or _token(srv)}"} if token is not None else {}

    def call() -> httpx.Response:
        return httpx.request(method, srv.http_url + path, json=body, headers=headers, timeout=30)

    return await asyncio.to_thread(call)


async def test_stored_models_are_offered_and_answer(running: RunningServer) -> None:
    async with client(running, _token(running), hello=False) as c:
        ready = await c.hello()
        assert {"okay", "brief", "smollm2", "tiny"} <= set(ready.models)
        await c.send(m.Chat("g1", "okay", [m.ChatMessage("user", "hi")]))
        deltas, done, _ = await c.until_done("g1")
        assert "".join(d.text for d in deltas) == "Okay."
        assert done.finish_reason == "stop"


async def test_modelfile_settings_apply(running: RunningServer) -> None:
    # num_ctx from the Modelfile sets the loaded context; SYSTEM and MESSAGE seed the chat.
    async with client(running, _token(running)) as c:
        await c.send(m.Chat("g1", "brief", [m.ChatMessage("user", "hi")]))
        _, done, _ = await c.until_done("g1")
    [loaded] = [x for x in running.gateway.engine.loaded() if x.name == "brief:latest"]
    assert loaded.n_ctx == 256
    # The prompt held system + the two seed messages + the user turn (rendered with ChatML).
    tokens_alone = done.usage.prompt_tokens
    async with client(running, _token(running)) as c:
        await c.send(
            m.Chat(
                "g2",
                "okay",
                [
                    m.ChatMessage("system", "Be brief."),
                    m.ChatMessage("user", "Ping?"),
                    m.ChatMessage("assistant", "Pong."),
                    m.ChatMessage("user", "hi"),
                ],
            )
        )
        _, same, _ = await c.until_done("g2")
    assert tokens_alone == same.usage.prompt_tokens


async def test_keep_alive_zero_unloads_after_the_answer(running: RunningServer) -> None:
    async with client(running, _token(running)) as c:
        await c.send(m.Generate("g1", "okay", "x", keep_alive="0"))
        await c.until_done("g1")
    for _ in range(100):
        if "okay:latest" not in running.gateway.engine.models():
            break
        await asyncio.sleep(0.05)
    r = await _http(running, "GET", "/v1/ps")
    assert r.status_code == 200 and r.json()["models"] == []
    async with client(running, _token(running)) as c:
        await c.send(m.Generate("g1", "okay", "x", keep_alive="forever"))
        err = await c.recv()
        assert isinstance(err, m.Error) and err.code.value == "bad_request"
        assert "keep_alive" in err.message


async def test_ws_pull_streams_progress_then_success(
    running: RunningServer, okay_model: Path
) -> None:
    data = okay_model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with serve_payload(data, "/dl/remote.gguf") as srv:
        srv.behaviour.slow_requests, srv.behaviour.slow_delay = 1, 0.01
        async with client(running, _token(running)) as c:
            await c.send(m.Pull("p1", "remote", source=srv.url, sha256=digest))
            seen: list[m.Progress] = []
            while True:
                msg = await c.recv()
                assert isinstance(msg, m.Progress), msg
                seen.append(msg)
                if msg.status == "success":
                    break
            assert seen[0].status == "pulling manifest"
            assert any(p.completed and p.total == len(data) for p in seen)
            # The pulled model answers at once.
            await c.send(m.Chat("g1", "remote", [m.ChatMessage("user", "hi")]))
            deltas, _, _ = await c.until_done("g1")
            assert "".join(d.text for d in deltas) == "Okay."
            # Local paths are refused over the network; so is a bad digest, typed.
            await c.send(m.Pull("p2", "x", source="/etc/passwd"))
            err = await c.recv()
            assert isinstance(err, m.Error) and err.id == "p2" and err.code.value == "forbidden"
            await c.send(m.Pull("p3", "y", source=srv.url, sha256="0" * 64))
            while True:
                msg = await c.recv()
                if isinstance(msg, m.Error):
                    break
            assert msg.id == "p3" and msg.code.value == "engine_error"
            assert "sha256" in msg.message


async def test_http_model_routes(running: RunningServer, okay_model: Path) -> None:
    r = await _http(running, "GET", "/v1/models", token=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"

    listing = (await _http(running, "GET", "/v1/models")).json()
    assert listing["object"] == "list"
    names = {x["id"] for x in listing["data"]}
    assert {"okay", "brief"} <= names
    assert any(x["name"] == "smollm2" for x in listing["catalog"])

    shown = (await _http(running, "GET", "/v1/models/brief")).json()
    assert shown["parameters"] == {"temperature": 0.0, "num_ctx": 256}
    assert shown["system"] == "Be brief." and shown["parent"] is None
    assert "PARAMETER num_ctx 256" in shown["modelfile"]
    assert (await _http(running, "GET", "/v1/models/nope")).status_code == 404

    r = await _http(running, "POST", "/v1/models/copy", {"source": "okay", "destination": "o2"})
    assert r.status_code == 200 and r.json()["name"] == "o2"
    r = await _http(
        running,
        "POST",
        "/v1/models/create",
        {"name": "warm", "modelfile": "FROM okay\nPARAMETER temperature 0.7\n"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["parent"] == "okay"
    r = await _http(
        running, "POST", "/v1/models/create", {"name": "bad", "modelfile": "FROM okay\nFOO 1\n"}
    )
    assert r.status_code == 400 and "modelfile:2 (FOO)" in r.json()["error"]["message"]
    r = await _http(
        running, "POST", "/v1/models/create", {"name": "x", "modelfile": "FROM /etc/hosts\n"}
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await _http(running, "POST", "/v1/models/copy", {"source": "okay"})
    assert r.status_code == 400 and "destination" in r.json()["error"]["message"]
    r = await _http(running, "POST", "/v1/models/copy", {"source": 1, "destination": "z"})
    assert r.status_code == 400 and "$.source" in r.json()["error"]["message"]

    # Load one, see it in ps, unload it.
    async with client(running, _token(running)) as c:
        await c.send(m.Generate("g1", "o2", "x"))
        await c.until_done("g1")
    ps = (await _http(running, "GET", "/v1/ps")).json()["models"]
    assert [x["name"] for x in ps] == ["o2:latest"]
    assert ps[0]["size"] > 0 and ps[0]["expires_at"] is not None
    r = await _http(running, "POST", "/v1/models/unload", {"model": "o2"})
    assert r.status_code == 200 and r.json() == {"unloaded": "o2:latest"}
    assert (await _http(running, "GET", "/v1/ps")).json()["models"] == []
    r = await _http(running, "POST", "/v1/models/unload", {"model": "o2"})
    assert r.status_code == 404

    r = await _http(running, "DELETE", "/v1/models/o2")
    assert r.status_code == 200 and r.json()["blobs_removed"] == []  # "okay" shares the blob
    r = await _http(running, "DELETE", "/v1/models/o2")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_http_pull_streams_server_sent_events(
    running: RunningServer, okay_model: Path
) -> None:
    data = okay_model.read_bytes()
    with serve_payload(data) as srv:

        def pull(body: dict[str, Any]) -> tuple[int, list[tuple[str, Any]]]:
            token = _token(running)
            events: list[tuple[str, Any]] = []
            with httpx.stream(
                "POST",
                running.http_url + "/v1/models/pull",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            ) as r:
                event = ""
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        events.append((event, json.loads(line[6:])))
                return r.status_code, events

        status, events = await asyncio.to_thread(pull, {"model": "sse", "source": srv.url})
        assert status == 200
        assert events[0] == ("progress", {"status": "pulling manifest"})
        assert events[-1][0] == "success" and events[-1][1]["name"] == "sse"
        status, events = await asyncio.to_thread(
            pull, {"model": "sse2", "source": srv.url, "sha256": "1" * 64}
        )
        assert events[-1][0] == "error"
        assert events[-1][1]["error"]["code"] == "engine_error"
        status, _ = await asyncio.to_thread(pull, {"model": "x", "source": "file:///etc/hosts"})
        assert status == 403
        r = await _http(
            running,
            "POST",
            "/v1/models/pull",
            {"model": "sse3", "stream": False, "source": srv.url},
        )
        assert r.status_code == 200 and r.json()["status"] == "success"


async def test_ws_pull_can_be_cancelled_and_resumed(
    running: RunningServer, okay_model: Path
) -> None:
    data = okay_model.read_bytes()
    with serve_payload(data) as srv:
        srv.behaviour.slow_requests, srv.behaviour.slow_delay = 1, 0.1
        async with client(running, _token(running)) as c:
            await c.send(m.Pull("p1", "later", source=srv.url))
            while srv.behaviour.sent() < 2 * 64 * 1024:
                await asyncio.sleep(0.02)
            await c.send(m.Cancel("p1"))
            while True:
                msg = await c.recv()
                if isinstance(msg, m.Error):
                    break
                assert isinstance(msg, m.Progress) and msg.status != "success"
            assert msg.id == "p1" and msg.code.value == "cancelled"
            # The partial stays; the next pull continues it with a Range request.
            await c.send(m.Pull("p2", "later", source=srv.url))
            while True:
                msg = await c.recv()
                assert isinstance(msg, m.Progress), msg
                if msg.status == "success":
                    break
        last = srv.behaviour.requests[-1]
        assert last.range is not None and last.range != "bytes=0-"
