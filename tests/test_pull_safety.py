"""Pulls over the network cannot reach the server's neighbours or fill its disk.

Each attack runs against a real gateway with real loopback HTTP servers: a
pull of a loopback URL, a redirect from an allowed host to a forbidden one, an
endless body, a full partial-download quota; plus credentials in URLs and the
permissions of the state directory.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.store.netpolicy import AddressPolicy
from engine.tinymodels import write_tiny_llama
from gateway.config import SourcesConfig
from gateway.scopes import ALL_SCOPES, LOOPBACK_SCOPES
from gateway.server import RunningServer

from .gateway_helpers import gateway, server_config

HTTP = ["https", "http", "hf", "pypi", "tiny"]


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("m") / "m.gguf"
    return write_tiny_llama(path, script="Okay.", script_eos=True).read_bytes()


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def file_handler(payload: bytes, seen: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def redirect_handler(target: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


class EndlessHandler(BaseHTTPRequestHandler):
    """A body without a length that never ends (until the client goes away)."""

    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        chunk = b"GGUF" + b"\0" * 65532
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                self.wfile.write(chunk)
        except OSError:
            pass


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Any]:
    servers: list[Any] = []

    async def start(**sources: Any) -> RunningServer:
        config = server_config(
            tmp_path / f"home{len(servers)}", {}, sources=SourcesConfig(**sources)
        )
        cm = gateway(config)
        srv = await cm.__aenter__()
        servers.append(cm)
        return srv

    yield start
    for cm in reversed(servers):
        await cm.__aexit__(None, None, None)


def _pull(
    srv: RunningServer, body: dict[str, Any], scopes: frozenset[str] = LOOPBACK_SCOPES
) -> httpx.Response:
    token = srv.gateway.auth.issue_token(sub="u", ttl=600, scopes=scopes)
    return httpx.post(
        srv.http_url + "/v1/models/pull",
        json={"stream": False, **body},
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )


def _leftovers(srv: RunningServer) -> list[str]:
    partial = Path(srv.gateway.config.home) / "models" / "partial"
    return sorted(p.name for p in partial.iterdir() if not p.name.endswith(".lock"))


async def test_loopback_and_redirects_to_it_are_refused(
    make_server: Any, model_bytes: bytes
) -> None:
    seen: list[str] = []
    with http_server(file_handler(model_bytes, seen)) as inner:
        url = f"http://127.0.0.1:{inner}/m.gguf"
        with http_server(redirect_handler(url)) as front:
            srv = await make_server(schemes=HTTP, allow_hosts=[f"127.0.0.1:{front}"])
            r = await asyncio.to_thread(_pull, srv, {"model": "direct", "source": url})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            direct = r.json()["error"]["message"]
            r = await asyncio.to_thread(
                _pull, srv, {"model": "hop", "source": f"http://127.0.0.1:{front}/x"}
            )
            assert r.status_code == 403
            # The same words for both: nothing tells which hop, address or port it was.
            assert r.json()["error"]["message"].split(": ", 1)[1] == direct.split(": ", 1)[1]
            # A closed port is refused with the same words (no port scanning).
            r = await asyncio.to_thread(
                _pull, srv, {"model": "closed", "source": "http://127.0.0.1:9/m.gguf"}
            )
            assert r.status_code == 403
            assert r.json()["error"]["message"].split(": ", 1)[1] == direct.split(": ", 1)[1]
            assert seen == []  # the forbidden server never saw a request
            assert _leftovers(srv) == []
            # Listing the inner server lets the same pull through, redirect included.
            ok = await make_server(schemes=HTTP, allow_hosts=["127.0.0.1"])
            r = await asyncio.to_thread(
                _pull, ok, {"model": "hop", "source": f"http://127.0.0.1:{front}/x"}
            )
            assert r.status_code == 200, r.text
            assert seen == ["/m.gguf"]


async def test_an_endless_body_stops_at_the_cap_and_leaves_nothing(make_server: Any) -> None:
    with http_server(EndlessHandler) as port:
        srv = await make_server(schemes=HTTP, allow_hosts=["127.0.0.1"], max_pull_bytes="1MiB")
        r = await asyncio.to_thread(
            _pull, srv, {"model": "endless", "source": f"http://127.0.0.1:{port}/m.gguf"}
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert _leftovers(srv) == []


async def test_partial_quota_and_stale_partials(make_server: Any, model_bytes: bytes) -> None:
    seen: list[str] = []
    with http_server(file_handler(model_bytes, seen)) as port:
        url = f"http://127.0.0.1:{port}/m.gguf"
        srv = await make_server(
            schemes=HTTP, allow_hosts=["127.0.0.1"], partial_quota="1MiB", partial_max_age="1h"
        )
        partial = Path(srv.gateway.config.home) / "models" / "partial"
        (partial / ("a" * 64 + ".partial")).write_bytes(b"\0" * (1024 * 1024))
        r = await asyncio.to_thread(_pull, srv, {"model": "q", "source": url})
        assert r.status_code == 413 and "unfinished downloads" in r.json()["error"]["message"]
        # Once that partial is old enough to be stale, the next pull removes it and goes on.
        old = time.time() - 7200
        os.utime(partial / ("a" * 64 + ".partial"), (old, old))
        r = await asyncio.to_thread(_pull, srv, {"model": "q", "source": url})
        assert r.status_code == 200, r.text
        assert _leftovers(srv) == []


async def test_credentials_in_urls_are_never_shown(make_server: Any, model_bytes: bytes) -> None:
    seen: list[str] = []
    with http_server(file_handler(model_bytes, seen)) as port:
        srv = await make_server(schemes=HTTP, allow_hosts=["127.0.0.1"])
        url = f"http://user:s3cret@127.0.0.1:{port}/m.gguf"
        r = await asyncio.to_thread(_pull, srv, {"model": "cred", "source": url}, ALL_SCOPES)
        assert r.status_code == 200, r.text
        assert "s3cret" not in r.text and r.json()["source"] == f"http://127.0.0.1:{port}/m.gguf"
        bad = f"http://user:s3cret@127.0.0.1:{port}/m.gguf"
        r = await asyncio.to_thread(
            _pull, srv, {"model": "cred2", "source": bad, "sha256": "0" * 64}, ALL_SCOPES
        )
        assert r.status_code >= 400 and "s3cret" not in r.text


async def test_state_directory_and_store_are_private(make_server: Any, model_bytes: bytes) -> None:
    seen: list[str] = []
    with http_server(file_handler(model_bytes, seen)) as port:
        srv = await make_server(schemes=HTTP, allow_hosts=["127.0.0.1"])
        r = await asyncio.to_thread(
            _pull, srv, {"model": "p", "source": f"http://127.0.0.1:{port}/m.gguf"}
        )
        assert r.status_code == 200
    home = Path(srv.gateway.config.home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    blobs = list((home / "models" / "blobs").iterdir())
    assert blobs and all(stat.S_IMODE(b.stat().st_mode) & 0o007 == 0 for b in blobs)


def test_address_policy() -> None:
    policy = AddressPolicy(["127.0.0.1:8080", "10.0.0.0/8", "models.internal", "[::1]:9000"])
    assert policy.allows("example.com", 443, "93.184.215.14")
    assert policy.allows("x", 8080, "127.0.0.1") and not policy.allows("x", 8081, "127.0.0.1")
    assert policy.allows("x", 1, "10.9.8.7") and not policy.allows("x", 1, "192.168.1.1")
    assert policy.allows("models.internal", 80, "172.16.0.5")
    assert policy.allows("h", 9000, "::1") and not policy.allows("h", 9001, "::1")
    for private in (
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "100.64.0.1",
    ):
        assert not AddressPolicy().allows("h", 80, private), private


async def test_every_hop_keeps_to_the_allowed_schemes(tmp_path: Path, model_bytes: bytes) -> None:
    """The scheme is checked by the transport, so each hop of a redirect chain is: a
    download that began on https never continues on http, and a policy naming its schemes
    (video urls: ``https`` unless http is allowed) holds from the first request on."""
    from engine.store.download import Downloader
    from engine.store.errors import StoreError
    from engine.store.netpolicy import SchemeRefused, guarded_transport

    seen: list[str] = []
    with http_server(file_handler(model_bytes, seen)) as port:
        url = f"http://127.0.0.1:{port}/m.gguf"
        strict = Downloader(tmp_path / "a", policy=AddressPolicy(["127.0.0.1"], schemes=["https"]))
        with pytest.raises(StoreError) as info:
            await strict.fetch(url)
        assert info.value.reason == "forbidden" and "http://" in info.value.message
        assert seen == []
        # What a download begun on https uses for its later hops.
        after_https = guarded_transport(AddressPolicy(["127.0.0.1"]), {"https"})
        async with httpx.AsyncClient(transport=after_https) as client:
            with pytest.raises(SchemeRefused):
                await client.get(url)
        assert seen == []
        plain = AddressPolicy(["127.0.0.1"], schemes=["https", "http"])
        got = await Downloader(tmp_path / "b", policy=plain).fetch(url)
        assert got.path.read_bytes() == model_bytes and seen == ["/m.gguf"]
