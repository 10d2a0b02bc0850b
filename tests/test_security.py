"""Attacks on a real server, each refused: files outside the store, other tenants' models,
foreign web pages and DNS rebinding, revoked keys, and what an answer may reveal.

Every test runs the attack against a running gateway on a loopback port with
real clients (httpx, websockets) and asserts the refusal and that nothing
changed; the allowed paths (same-origin page, localhost origins, admins) are
checked beside them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from engine.store.pull import ModelManager
from engine.store.store import ModelStore
from gateway.config import AuthConfig, SourcesConfig
from gateway.scopes import ALL_SCOPES, LOOPBACK_SCOPES
from gateway.server import RunningServer
from protocol import messages as m

from .gateway_helpers import JSON, client, gateway, server_config

WRITER = LOOPBACK_SCOPES  # generate, models:read, models:write


@pytest.fixture
async def running(tmp_path: Path, okay_model: Path) -> AsyncIterator[RunningServer]:
    """A gateway whose shared store holds "okay"; a secret GGUF lies outside the store."""
    home = tmp_path / "home"
    manager = ModelManager(ModelStore(home / "models"))
    await manager.pull(str(okay_model))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "private.gguf").write_bytes(okay_model.read_bytes())
    imports = tmp_path / "imports"
    imports.mkdir()
    (imports / "allowed.gguf").write_bytes(okay_model.read_bytes())
    (imports / "link.gguf").symlink_to(tmp_path / "secret" / "private.gguf")
    sources = SourcesConfig(local_dirs=[str(imports)])
    config = server_config(home, {}, sources=sources, auth=AuthConfig(leeway=0.0))
    async with gateway(config) as srv:
        yield srv


def _token(srv: RunningServer, sub: str = "alice", **kw: Any) -> str:
    return srv.gateway.auth.issue_token(sub=sub, ttl=600, **kw)


def _http(
    srv: RunningServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    h = {"Authorization": f"Bearer {token}"} if token else {}
    h.update(headers or {})
    kw: dict[str, Any] = {"content": content} if content is not None else {"json": body}
    return httpx.request(method, srv.http_url + path, headers=h, timeout=30, **kw)


async def _ahttp(srv: RunningServer, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    return await asyncio.to_thread(_http, srv, method, path, body, **kw)


def _stored(srv: RunningServer) -> set[str]:
    return {r.ref.short for r in srv.gateway.models.manager.store.models()}


# -- 1. files outside the store --------------------------------------------------------


async def test_relative_and_absolute_paths_are_refused_alike_and_import_nothing(
    running: RunningServer, tmp_path: Path
) -> None:
    admin = _token(running, scopes=ALL_SCOPES)
    secret = tmp_path / "secret" / "private.gguf"
    climb = "a/" + "../" * 12 + str(secret).lstrip("/")
    missing = "a/" + "../" * 12 + "no/such/file.gguf"
    before = _stored(running)
    answers = []
    for source in (climb, missing, str(secret), f"file://{secret}", str(tmp_path / "secret")):
        r = await _ahttp(
            running,
            "POST",
            "/v1/models/pull",
            {"model": "x", "source": source, "stream": False},
            token=admin,
        )
        answers.append((r.status_code, r.json()["error"]["message"]))
        r = await _ahttp(
            running,
            "POST",
            "/v1/models/create",
            {"name": "y", "modelfile": f"FROM {source}\n"},
            token=admin,
        )
        answers.append((r.status_code, r.json()["error"]["message"]))
        r = await _ahttp(running, "POST", "/api/create", {"model": "z", "from": source})
        answers.append((r.status_code, r.json()["error"]))
    # The same refusal whether the path exists, is a folder or is missing: no oracle.
    assert {a[0] for a in answers} == {403}
    assert len({a[1] for a in answers}) <= 2, answers  # one text per surface shape
    async with client(running, admin) as c:
        await c.send(m.Pull("p1", "w", source=climb))
        err = await c.recv()
        assert isinstance(err, m.Error) and err.code.value == "forbidden"
    assert _stored(running) == before


async def test_admin_imports_only_inside_the_allowed_directory(
    running: RunningServer, tmp_path: Path
) -> None:
    admin = _token(running, scopes=ALL_SCOPES)
    writer = _token(running, scopes=WRITER)
    allowed = tmp_path / "imports" / "allowed.gguf"
    body = {"model": "mine", "source": str(allowed), "stream": False}
    r = await _ahttp(running, "POST", "/v1/models/pull", body, token=writer)
    assert r.status_code == 403  # not an admin
    r = await _ahttp(running, "POST", "/v1/models/pull", body, token=admin)
    assert r.status_code == 200, r.text
    # A symlink inside the allowed directory that points outside is judged by its target.
    link = tmp_path / "imports" / "link.gguf"
    r = await _ahttp(
        running,
        "POST",
        "/v1/models/pull",
        {"model": "l", "source": str(link), "stream": False},
        token=admin,
    )
    assert r.status_code == 403
    assert "mine" in _stored(running) and "l" not in _stored(running)


# -- 2. tenants' models ----------------------------------------------------------------


async def test_tenants_cannot_see_change_or_shadow_each_others_models(
    running: RunningServer,
) -> None:
    a = _token(running, "ann", tenant="A", scopes=WRITER)
    b = _token(running, "bob", tenant="B", scopes=WRITER)
    mf = 'FROM okay\nSYSTEM """A\'s secret prompt"""\n'
    r = await _ahttp(
        running, "POST", "/v1/models/create", {"name": "amodel", "modelfile": mf}, token=a
    )
    assert r.status_code == 200, r.text
    # B does not see A's model, cannot read its SYSTEM, cannot delete or use it.
    names = {x["id"] for x in (await _ahttp(running, "GET", "/v1/models", token=b)).json()["data"]}
    assert "amodel" not in names and "okay" in names
    assert (await _ahttp(running, "GET", "/v1/models/amodel", token=b)).status_code == 404
    r = await _ahttp(running, "POST", "/api/show", {"model": "amodel"}, token=b)
    assert r.status_code == 404
    r = await _ahttp(running, "DELETE", "/v1/models/amodel", token=b)
    assert r.status_code == 404
    async with client(running, b) as c:
        await c.send(m.Chat("g1", "amodel", [m.ChatMessage("user", "hi")]))
        err = await c.recv()
        assert isinstance(err, m.Error) and err.code.value == "model_not_found"
    # B makes its own "amodel": A's is untouched and still answers with A's SYSTEM.
    r = await _ahttp(
        running,
        "POST",
        "/v1/models/create",
        {"name": "amodel", "modelfile": 'FROM okay\nSYSTEM "B"\n'},
        token=b,
    )
    assert r.status_code == 200, r.text
    shown = (await _ahttp(running, "GET", "/v1/models/amodel", token=a)).json()
    assert shown["system"] == "A's secret prompt"
    assert (await _ahttp(running, "GET", "/v1/models/amodel", token=b)).json()["system"] == "B"
    # A shared name cannot be taken, and shared models are read-only to tenants.
    r = await _ahttp(
        running, "POST", "/v1/models/copy", {"source": "amodel", "destination": "okay"}, token=b
    )
    assert r.status_code == 409
    r = await _ahttp(running, "DELETE", "/v1/models/okay", token=b)
    assert r.status_code == 403
    assert "okay" in _stored(running) and "amodel" not in _stored(running)
    # Each tenant's model runs under its own name in the engine.
    async with client(running, a) as c:
        await c.send(m.Chat("g1", "amodel", [m.ChatMessage("user", "hi")]))
        deltas, done, _ = await c.until_done("g1")
        assert "".join(d.text for d in deltas) == "Okay." and done.finish_reason == "stop"
    ps_b = (await _ahttp(running, "GET", "/v1/ps", token=b)).json()["models"]
    assert ps_b == []  # A's loaded model is not B's business
    ps_a = (await _ahttp(running, "GET", "/v1/ps", token=a)).json()["models"]
    assert [x["name"] for x in ps_a] == ["amodel:latest"] and ps_a[0]["path"] == ""


async def test_model_management_needs_the_write_scope(running: RunningServer) -> None:
    user = _token(running)  # default scopes: generate, models:read
    r = await _ahttp(
        running, "POST", "/v1/models/copy", {"source": "okay", "destination": "o2"}, token=user
    )
    assert r.status_code == 403 and "models:write" in r.json()["error"]["message"]
    r = await _ahttp(running, "DELETE", "/v1/models/okay", token=user)
    assert r.status_code == 403
    r = await _ahttp(
        running, "POST", "/v1/models/pull", {"model": "tiny", "stream": False}, token=user
    )
    assert r.status_code == 403
    assert (await _ahttp(running, "GET", "/v1/models", token=user)).status_code == 200
    assert _stored(running) == {"okay"}


# -- 3. browsers -----------------------------------------------------------------------


async def test_foreign_pages_and_rebinding_hosts_are_refused(running: RunningServer) -> None:
    evil = {"Origin": "https://evil.example"}
    # A "simple" cross-origin POST (text/plain, no preflight) from any page: refused.
    r = await _ahttp(
        running,
        "POST",
        "/api/pull",
        headers={**evil, "Content-Type": "text/plain"},
        content=b'{"model": "tiny"}',
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await _ahttp(running, "POST", "/api/create", {"model": "c", "from": "okay"}, headers=evil)
    assert r.status_code == 403
    # DNS rebinding: the page's own origin, but a Host the server does not answer to.
    rebound = {"Host": "evil.example", "Origin": "http://evil.example"}
    assert (await _ahttp(running, "GET", "/api/tags", headers=rebound)).status_code == 403
    assert (
        await _ahttp(running, "GET", "/api/tags", headers={"Host": "evil.example"})
    ).status_code == 403
    # A JSON route refuses a browser's non-JSON body even from an allowed origin.
    local = {"Origin": "http://localhost:3000", "Content-Type": "text/plain"}
    r = await _ahttp(running, "POST", "/api/show", headers=local, content=b'{"model":"okay"}')
    assert r.status_code == 415
    # CORS preflight: answered for loopback origins, refused for others.
    pre = {"Access-Control-Request-Method": "POST"}
    ok = await _ahttp(
        running, "OPTIONS", "/api/chat", headers={**pre, "Origin": "http://127.0.0.1:5173"}
    )
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == "http://127.0.0.1:5173"
    bad = await _ahttp(running, "OPTIONS", "/api/chat", headers={**pre, **evil})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
    assert _stored(running) == {"okay"}
    # WebSocket handshakes from foreign pages are refused before the upgrade.
    token = _token(running)
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(
            running.ws_url,
            origin="https://evil.example",  # type: ignore[arg-type]
            additional_headers={"Authorization": f"Bearer {token}"},
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_allowed_pages_and_clients_still_work(running: RunningServer) -> None:
    # The chat page itself (same origin) and a localhost dev server may call the API.
    origin = running.http_url
    r = await _ahttp(running, "GET", "/api/tags", headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    r = await _ahttp(
        running, "POST", "/api/show", {"model": "okay"}, headers={"Origin": "http://localhost:8080"}
    )
    assert r.status_code == 200
    # curl's default form type without a browser's headers still works (Ollama's examples).
    r = await _ahttp(
        running,
        "POST",
        "/api/show",
        content=b'{"model":"okay"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200
    token = _token(running)
    async with connect(
        running.ws_url,
        origin=origin,  # type: ignore[arg-type]
        subprotocols=[m.SUBPROTOCOL_JSON],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {token}"},
    ) as ws:
        await ws.send(JSON.encode(m.Hello()))
        assert isinstance(JSON.decode_server(await ws.recv()), m.Ready)


async def test_without_auth_a_foreign_page_still_cannot_open_a_websocket(
    tmp_path: Path, okay_model: Path
) -> None:
    config = server_config(tmp_path, {"okay": okay_model}, auth=AuthConfig(enabled=False))
    async with gateway(config) as srv:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(srv.ws_url, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        async with client(srv, None) as c:  # no Origin: a local program
            await c.send(m.Generate("g1", "okay", "hi"))
            deltas, _, _ = await c.until_done("g1")
            assert "".join(d.text for d in deltas) == "Okay."


# -- 4. revocation and lifetimes -------------------------------------------------------


async def test_revoking_a_key_closes_its_sessions_and_spends_its_tickets(
    running: RunningServer,
) -> None:
    auth = running.gateway.auth
    key = auth.api_keys.create("carol")
    other = auth.api_keys.create("dave")
    ticket = (await _ahttp(running, "POST", "/v1/tickets", token=key)).json()["ticket"]
    async with client(running, key) as doomed, client(running, other) as kept:
        await asyncio.to_thread(auth.api_keys.revoke, key)
        err = await asyncio.wait_for(doomed.recv(), 10)
        assert isinstance(err, m.Error) and err.code.value == "unauthorized"
        assert "revoked" in err.message
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(doomed.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        # The other key's session goes on.
        await kept.send(m.Generate("g1", "okay", "hi"))
        deltas, _, _ = await kept.until_done("g1")
        assert "".join(d.text for d in deltas) == "Okay."
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(f"{running.ws_url}?ticket={ticket}"):
            pass
    assert refused.value.response.status_code == 401


async def test_token_lifetime_cap_and_empty_tenant(running: RunningServer) -> None:
    auth = running.gateway.auth
    long_lived = auth.issue_token(sub="x", ttl=365 * 86400)
    r = await _ahttp(running, "GET", "/v1/models", token=long_lived)
    assert r.status_code == 401 and "lifetime" in r.json()["error"]["message"]
    import jwt

    secret = (Path(running.gateway.config.home) / "secret").read_text().strip()
    now = int(time.time())
    empty = jwt.encode({"sub": "x", "exp": now + 60, "tenant": ""}, bytes.fromhex(secret))
    r = await _ahttp(running, "GET", "/v1/models", token=empty)
    assert r.status_code == 401


# -- 7. information --------------------------------------------------------------------


async def test_answers_reveal_paths_and_credentials_to_admins_only(
    running: RunningServer,
) -> None:
    r = await _ahttp(running, "GET", "/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    admin = _token(running, scopes=ALL_SCOPES)
    assert "workers" in (await _ahttp(running, "GET", "/readyz", token=admin)).json()
    user = _token(running)
    shown = (await _ahttp(running, "GET", "/v1/models/okay", token=user)).json()
    assert shown["source"] is None and "/" not in shown["modelfile"].split("\n")[0]
    assert (await _ahttp(running, "GET", "/v1/models/okay", token=admin)).json()["source"]
    show = (await _ahttp(running, "POST", "/api/show", {"model": "okay"})).json()
    assert "ferrous.source" not in show["model_info"]
    assert json.dumps(show).count(str(Path(running.gateway.config.home))) == 0
