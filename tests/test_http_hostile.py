"""Hostile bodies on every HTTP route: a 4xx with a JSON error (or a valid answer), never a 5xx."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from .gateway_helpers import gateway, server_config

POST_ROUTES = [
    "/v1/generate",
    "/v1/chat",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models/pull",
    "/v1/models/copy",
    "/v1/models/create",
    "/v1/models/unload",
    "/v1/tickets",
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/api/pull",
    "/api/copy",
    "/api/create",
]

BODIES: list[bytes] = [
    b"",
    b"null",
    b"[]",
    b'"text"',
    b"{",
    b"\xff\xfe\x00garbage",
    b'{"model": 5}',
    b'{"model": "eos", "prompt": ["a"]}',
    b'{"model": "eos", "messages": "hi"}',
    b'{"model": "eos", "messages": [{"role": "wizard", "content": "x"}]}',
    b'{"model": "eos", "prompt": "x", "options": {"temperature": 1e999}}',
    b'{"model": "eos", "prompt": "x", "options": {"seed": 99999999999999999999999}}',
    b'{"model": "eos", "input": [[1, 2]]}',
    b'{"model": "' + b"m" * 5000 + b'", "prompt": "x"}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"model": "../../etc/passwd", "prompt": "x"}',
    b'{"model": "eos", "prompt": "x", "format": {"type": 12}}',
    b'{"model": "eos", "prompt": "x", "format": "json", "stream": "yes"}',
]


async def test_no_body_makes_the_server_fail(tmp_path: Path, eos_model: Path) -> None:
    async with gateway(server_config(tmp_path, {"eos": eos_model})) as srv:
        token = srv.gateway.auth.issue_token(sub="mallory", ttl=600)

        def hammer() -> list[tuple[str, bytes, int, str]]:
            bad: list[tuple[str, bytes, int, str]] = []
            with httpx.Client(
                base_url=srv.http_url,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                timeout=30,
            ) as c:
                for route in POST_ROUTES:
                    for body in BODIES:
                        r = c.post(route, content=body)
                        if r.status_code < 400:
                            continue  # some of these are valid on some routes
                        try:
                            has_error = "error" in r.json()
                        except ValueError:
                            has_error = False
                        if r.status_code >= 500 or not has_error:
                            bad.append((route, body[:60], r.status_code, r.text[:200]))
            return bad

        assert await asyncio.to_thread(hammer) == []

        # The server is whole afterwards.
        def works() -> httpx.Response:
            return httpx.post(
                srv.http_url + "/v1/generate",
                json={"model": "eos", "prompt": "hi", "options": {"temperature": 0}},
                headers={"Authorization": f"Bearer {token}"},
            )

        r = await asyncio.to_thread(works)
        assert r.status_code == 200 and r.json()["text"] == "Done."


async def test_deeply_nested_websocket_messages_are_typed_errors(
    tmp_path: Path, eos_model: Path
) -> None:
    from protocol import messages as m

    from .gateway_helpers import client

    async with gateway(server_config(tmp_path, {"eos": eos_model})) as srv:
        token = srv.gateway.auth.issue_token(sub="mallory", ttl=600)
        async with client(srv, token) as c:
            deep = '{"a":' * 5000 + "1" + "}" * 5000
            await c.send_raw(
                '{"type": "generate", "id": "g1", "model": "eos", "prompt": "x", "format": '
                + deep
                + "}"
            )
            err = await c.recv()
            assert isinstance(err, m.Error) and err.code.value == "bad_request"
            assert "nested too deeply" in err.message
            await c.send(m.Generate("g2", "eos", "hi", m.Options(temperature=0)))
            deltas, done, _ = await c.until_done("g2")
            assert "".join(d.text for d in deltas) == "Done." and done.finish_reason == "stop"
