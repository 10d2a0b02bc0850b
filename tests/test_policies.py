"""The pure decisions behind the security checks: origins, hosts, content types, scopes, sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.origins import (
    BrowserPolicy,
    host_allowed,
    json_body_refusal,
    origin_allowed,
    split_host,
)
from gateway.scopes import ADMIN, DEFAULT_SCOPES, GENERATE, MODELS_WRITE, allows, parse_scopes
from gateway.sourcepolicy import check_remote_source, confined_path
from protocol.errors import Forbidden

POLICY = BrowserPolicy(
    origins=["https://app.example", "https://*.corp.example"],
    hosts=["chat.example", ".internal.example"],
    bound_host="127.0.0.1",
    machine_names=["box", "box.local"],
)


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("127.0.0.1:11480", ("127.0.0.1", 11480)),
        ("LOCALHOST", ("localhost", None)),
        ("[::1]:80", ("::1", 80)),
        ("::1", ("::1", None)),
        ("example.com.", ("example.com", None)),
        ("a:99999", None),
        ("user@host", None),
        ("", None),
        ("[::1", None),
    ],
)
def test_split_host(header: str, parsed: tuple[str, int | None] | None) -> None:
    assert split_host(header) == parsed


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:11480", True),
        ("localhost:11480", True),
        ("app.localhost", True),
        ("[::1]:11480", True),
        ("192.168.1.20:11480", True),  # an IP literal: no DNS name to rebind
        ("box:11480", True),
        ("box.local", True),
        ("chat.example", True),
        ("a.internal.example", True),
        ("internal.example", True),
        ("evil.example", False),
        ("chat.example.evil.example", False),
        ("localhost.evil.example", False),
        ("bad host", False),
    ],
)
def test_host_allow_list(host: str, ok: bool) -> None:
    assert host_allowed(POLICY, host) is ok


def test_any_host_and_missing_host() -> None:
    assert host_allowed(BrowserPolicy(hosts=["*"], machine_names=[]), "evil.example")
    assert host_allowed(POLICY, None)  # no Host header: not a browser


@pytest.mark.parametrize(
    ("origin", "host", "ok"),
    [
        ("http://127.0.0.1:11480", "127.0.0.1:11480", True),  # the chat page itself
        ("http://box:11480", "box:11480", True),
        ("http://localhost:3000", "127.0.0.1:11480", True),
        ("https://dev.localhost", "127.0.0.1:11480", True),
        ("http://[::1]:5173", "127.0.0.1:11480", True),
        ("https://app.example", "127.0.0.1:11480", True),
        ("http://app.example", "127.0.0.1:11480", False),  # scheme matters
        ("https://x.corp.example", "127.0.0.1:11480", True),
        ("https://corp.example.evil.example", "127.0.0.1:11480", False),
        ("https://evil.example", "127.0.0.1:11480", False),
        ("null", "127.0.0.1:11480", False),
        ("file://", "127.0.0.1:11480", False),
        ("http://127.0.0.1:9999/path", "127.0.0.1:11480", False),
    ],
)
def test_origin_allow_list(origin: str, host: str, ok: bool) -> None:
    assert origin_allowed(POLICY, origin, host) is ok


def test_any_origin() -> None:
    assert origin_allowed(BrowserPolicy(origins=["*"], machine_names=[]), "null", "x")


@pytest.mark.parametrize(
    ("content_type", "browser", "refused"),
    [
        ("application/json", True, False),
        ("application/json; charset=utf-8", True, False),
        ("application/vnd.api+json", True, False),
        ("text/plain", True, True),
        ("application/x-www-form-urlencoded", True, True),
        ("multipart/form-data; boundary=x", True, True),
        (None, True, True),
        (None, False, False),  # a program that sends no type
        ("application/x-www-form-urlencoded", False, False),  # curl -d
        ("text/plain", False, False),
        ("application/xml", False, True),
    ],
)
def test_json_body_content_types(content_type: str | None, browser: bool, refused: bool) -> None:
    assert (json_body_refusal(content_type, from_browser=browser) is not None) is refused


def test_scopes() -> None:
    assert parse_scopes(None) == DEFAULT_SCOPES
    assert parse_scopes("generate models:write") == {GENERATE, MODELS_WRITE}
    assert parse_scopes(["admin"]) == {ADMIN}
    for bad in ("generate root", "", [1], 3):
        with pytest.raises(ValueError):
            parse_scopes(bad)
    assert allows(frozenset({ADMIN}), MODELS_WRITE)
    assert not allows(DEFAULT_SCOPES, MODELS_WRITE)


def test_remote_sources(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "secret.gguf").write_bytes(b"GGUF")
    (allowed / "out.gguf").symlink_to(tmp_path / "secret.gguf")
    kw = {"schemes": ["https", "hf"], "local_dirs": [str(allowed)]}
    assert check_remote_source("smollm2", admin=False, **kw) == "smollm2"
    assert check_remote_source("team/chat:7b", admin=False, **kw) == "team/chat:7b"
    assert check_remote_source("https://h/m.gguf", admin=False, **kw) == "https://h/m.gguf"
    for refused in (
        "http://h/m.gguf",
        "pypi://p/x.gguf",
        "a/../../etc/passwd",
        "./m.gguf",
        "../m.gguf",
        "~/m.gguf",
        str(allowed / "m.gguf"),  # not an admin
    ):
        with pytest.raises(Forbidden):
            check_remote_source(refused, admin=False, **kw)
    inside = str(allowed / "m.gguf")
    assert check_remote_source(inside, admin=True, **kw) == "file://" + inside
    assert check_remote_source("file://" + inside, admin=True, **kw) == "file://" + inside
    for outside in (
        str(tmp_path / "secret.gguf"),
        str(allowed / "out.gguf"),  # a link pointing out
        str(allowed / ".." / "secret.gguf"),
        "relative/../allowed/m.gguf",
    ):
        with pytest.raises(Forbidden):
            check_remote_source(outside, admin=True, **kw)
    # Text that is a valid model name stays a name: looked up in the store, never on disk.
    assert check_remote_source("rel/in/m.gguf", admin=True, **kw) == "rel/in/m.gguf"
    assert confined_path(str(allowed / "missing.gguf"), [str(allowed)]) is not None
    assert confined_path(str(tmp_path / "allowedx" / "m"), [str(allowed)]) is None
