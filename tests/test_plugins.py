"""Backend plugins through the entry-point group: the example plugin (examples/ferrous-echo,
installed with the test requirements) serves a generation through the real server, and a
plugin that raises on import is skipped with its reason, never fatal."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.backends import registry
from engine.backends.registry import BUILTIN, entries, plugins

from .gateway_helpers import gateway, server_config

REPO = Path(__file__).resolve().parents[1]


async def test_the_example_plugin_serves_a_generation(tmp_path: Path) -> None:
    model = tmp_path / "hello.echo"
    model.write_text("You said: ")
    async with gateway(server_config(tmp_path / "home", {"hello": model})) as srv:
        token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
        async with httpx.AsyncClient(
            base_url=srv.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as c:
            r = await c.post("/v1/generate", json={"model": "hello", "prompt": "ping"})
            assert r.status_code == 200, r.text
            assert r.json()["text"] == "You said: ping"
            ps = (await c.get("/v1/ps")).json()["models"]
            assert [m["backend"] for m in ps if m["name"] == "hello"] == ["echo"]


def test_ferrous_backends_lists_built_ins_and_plugins() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "backends", "--json"],
        capture_output=True, text=True, check=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    listed = json.loads(out.stdout)
    rows = {(r["backend"], r["from"]) for r in listed["backends"]}
    assert ("echo", "ferrous-echo") in rows and ("llama_cpp", "built-in") in rows
    assert listed["backends"][0]["backend"] == "echo"  # plugins are tried first
    assert listed["skipped"] == []


@pytest.fixture
def broken_plugin(tmp_path: Path) -> Iterator[Path]:
    """A package whose backend module raises on import, declared in the group."""
    (tmp_path / "broken_backend.py").write_text("raise RuntimeError('the GPU driver is missing')\n")
    info = tmp_path / "broken_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-backend\nVersion: 0.1\n")
    (tmp_path / "exiting_backend.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "faulty_backend.py").write_text(
        "from engine.backends.entry import BackendEntry\n"
        "class Entry(BackendEntry):\n"
        "    name, package, module, cls = 'faulty', 'faulty_backend', 'faulty_backend', 'X'\n"
        "    def claims(self, path): raise ValueError('claims blew up')\n"
        "    def installed(self): raise ValueError('installed blew up')\n"
        "    def inspect(self, path): raise NotImplementedError\n"
        "    def size(self, found, inputs): raise NotImplementedError\n"
    )
    (info / "entry_points.txt").write_text(
        "[ferrousforge.backends]\nbroken = broken_backend:Entry\n"
        "exiting = exiting_backend:Entry\nfaulty = faulty_backend:Entry\n"
    )
    yield tmp_path


def test_a_plugin_that_raises_on_import_is_skipped_with_its_reason(
    broken_plugin: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(broken_plugin))
    registry.plugins.cache_clear()
    registry.entries.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="ferrous.engine"):
            found = {p.name: p for p in plugins()}
        assert "the GPU driver is missing" in found["broken"].error
        assert found["broken"].entries == ()
        assert "SystemExit" in found["exiting"].error  # an exit at import is not the server's
        assert set(map(type, BUILTIN)) <= set(map(type, entries()))  # the rest works
        # A plugin whose checks raise is a logged no: the other backends take the file.
        assert registry.find_entry("model.gguf").name == "llama_cpp"
        assert "faulty" not in registry.available_backends()
        assert any("skipped" in r.getMessage() for r in caplog.records)
    finally:
        registry.plugins.cache_clear()
        registry.entries.cache_clear()
    env = {**os.environ, "PYTHONPATH": f"{broken_plugin}{os.pathsep}{REPO}"}
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "backends", "--json"],
        capture_output=True, text=True, check=True, cwd=REPO, env=env, timeout=60,
    )  # fmt: skip
    skipped = json.loads(out.stdout)["skipped"]
    assert [s["plugin"] for s in skipped] == ["broken", "exiting"]
    assert "RuntimeError: the GPU driver is missing" in skipped[0]["error"]
