"""Credentials across the nodes of a deployment, through a real redis-server: a browser's
ticket fetched from one node opens a WebSocket on another, once; a revoked token or API key
is refused by every node and the sessions opened with it end; on one node the revocation
list is a file in FERROUS_HOME."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.config import AuthConfig, StateConfig
from gateway.server import RunningServer
from protocol import messages as m
from protocol.codec import codec_for

from .gateway_helpers import gateway, server_config
from .redisserver import redis_server

JSON = codec_for(m.SUBPROTOCOL_JSON)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path / "redis") as (url, _):
        yield url


def _cli(home: Path, secret: Path, *args: str, state: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FERROUS_HOME": str(home), "FERROUS_AUTH__SECRET_FILE": str(secret)}
    if state:
        env["FERROUS_STATE__URL"] = state
        env["FERROUS_STATE__PREFIX"] = "c:"
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _status(node: RunningServer, credential: str) -> tuple[int, str]:
    async with httpx.AsyncClient(base_url=node.http_url, timeout=30) as c:
        r = await c.get("/v1/models", headers={"Authorization": f"Bearer {credential}"})
    return r.status_code, r.text


async def _refused_within(node: RunningServer, credential: str, seconds: float = 10) -> str:
    """Poll until ``node`` refuses ``credential`` (the revocation watch rereads the list)."""
    async with asyncio.timeout(seconds):
        while True:
            status, text = await _status(node, credential)
            if status == 401:
                return text
            assert status == 200, text
            await asyncio.sleep(0.1)


async def _open_session(node: RunningServer, credential: str) -> object:
    ws = await connect(
        node.ws_url,
        subprotocols=[m.SUBPROTOCOL_JSON],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {credential}"},
    )
    await ws.send(JSON.encode(m.Hello()))
    assert isinstance(JSON.decode_server(await ws.recv()), m.Ready)
    return ws


async def _ended_as_revoked(ws: object) -> str:
    """The session's last words: an ``unauthorized`` error, then close 1008."""
    error = None
    async with asyncio.timeout(10):
        try:
            while True:
                msg = JSON.decode_server(await ws.recv())  # type: ignore[attr-defined]
                if isinstance(msg, m.Error):
                    error = msg
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1008
    assert error is not None and error.code == "unauthorized"
    return error.message


async def test_a_ticket_from_one_node_opens_a_websocket_on_another_once(
    tmp_path: Path, redis_url: str, script_model: Path
) -> None:
    auth = AuthConfig(secret_file=str(tmp_path / "secret"))
    state = StateConfig(url=redis_url, prefix="c:")
    models = {"script": script_model}
    async with (
        gateway(server_config(tmp_path / "a", models, state=state, auth=auth)) as a,
        gateway(server_config(tmp_path / "b", models, state=state, auth=auth)) as b,
    ):
        token = a.gateway.auth.issue_token(sub="alice", ttl=600)
        async with httpx.AsyncClient(base_url=a.http_url) as c:
            r = await c.post("/v1/tickets", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        ticket = r.json()["ticket"]
        async with connect(
            f"{b.ws_url}?ticket={ticket}",
            subprotocols=[m.SUBPROTOCOL_JSON],  # type: ignore[list-item]
        ) as ws:
            await ws.send(JSON.encode(m.Hello()))
            ready = JSON.decode_server(await ws.recv())
            assert isinstance(ready, m.Ready) and ready.user == "alice"
        # Spent: on this node and on the one that issued it.
        for node in (b, a):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(
                    f"{node.ws_url}?ticket={ticket}",
                    subprotocols=[m.SUBPROTOCOL_JSON],  # type: ignore[list-item]
                ):
                    pass
            assert refused.value.response.status_code == 401
            assert b"unknown or used ticket" in refused.value.response.body


async def test_a_revoked_token_is_refused_by_every_node_and_its_sessions_end(
    tmp_path: Path, redis_url: str, script_model: Path
) -> None:
    secret = tmp_path / "secret"
    auth = AuthConfig(secret_file=str(secret))
    state = StateConfig(url=redis_url, prefix="c:")
    models = {"script": script_model}
    async with (
        gateway(server_config(tmp_path / "a", models, state=state, auth=auth)) as a,
        gateway(server_config(tmp_path / "b", models, state=state, auth=auth)) as b,
    ):
        doomed = a.gateway.auth.issue_token(sub="alice", ttl=600)
        kept = a.gateway.auth.issue_token(sub="alice", ttl=600)
        assert (await _status(b, doomed))[0] == 200
        ws = await _open_session(b, doomed)
        out = _cli(tmp_path / "a", secret, "token", "--revoke", doomed, state=redis_url)
        assert out.returncode == 0, out.stderr
        for node in (a, b):
            assert "this token was revoked" in await _refused_within(node, doomed)
        assert "token revoked" in await _ended_as_revoked(ws)
        # Another token of the same user is untouched.
        assert (await _status(a, kept))[0] == 200 and (await _status(b, kept))[0] == 200
        # A token that is not this server's is not revoked by anyone.
        stranger = _cli(tmp_path / "x", tmp_path / "other-secret", "token", "--sub", "eve")
        out = _cli(tmp_path / "a", secret, "token", "--revoke", stranger.stdout.strip())
        assert out.returncode == 1 and "not a valid token" in out.stderr


async def test_an_api_key_revoked_at_one_node_is_refused_where_its_copy_remains(
    tmp_path: Path, redis_url: str, script_model: Path
) -> None:
    """Each node reads its own key file: node b keeps a copy of the key the revocation did
    not touch, and refuses the key all the same."""
    secret = tmp_path / "secret"
    made = _cli(tmp_path / "a", secret, "key", "create", "--user", "bob")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "api_keys.json", tmp_path / "b" / "api_keys.json")
    auth = AuthConfig(secret_file=str(secret))
    state = StateConfig(url=redis_url, prefix="c:")
    models = {"script": script_model}
    async with (
        gateway(server_config(tmp_path / "a", models, state=state, auth=auth)) as a,
        gateway(server_config(tmp_path / "b", models, state=state, auth=auth)) as b,
    ):
        ws = await _open_session(b, key)
        out = _cli(tmp_path / "a", secret, "key", "revoke", key, state=redis_url)
        assert out.returncode == 0, out.stderr
        assert "bob" in (tmp_path / "b" / "api_keys.json").read_text()  # b's copy is intact
        for node in (a, b):
            assert "API key" in await _refused_within(node, key)
        assert "API key revoked" in await _ended_as_revoked(ws)


async def test_on_one_node_a_token_is_revoked_through_a_file(
    tmp_path: Path, script_model: Path
) -> None:
    secret = tmp_path / "secret"
    auth = AuthConfig(secret_file=str(secret))
    async with gateway(server_config(tmp_path / "a", {"script": script_model}, auth=auth)) as a:
        token = a.gateway.auth.issue_token(sub="alice", ttl=600)
        ws = await _open_session(a, token)
        out = _cli(tmp_path / "a", secret, "token", "--revoke", token)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "a" / "revoked.json").stat().st_mode & 0o077 == 0
        assert "this token was revoked" in await _refused_within(a, token)
        assert "token revoked" in await _ended_as_revoked(ws)
        assert (await _status(a, a.gateway.auth.issue_token(sub="alice", ttl=600)))[0] == 200
