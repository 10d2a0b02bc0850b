"""The Ollama-compatible API, driven by the official ``ollama`` Python client against a real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from engine.modelfacts import facts_of
from engine.store.pull import ModelManager
from engine.store.sources import CatalogEntry
from engine.store.store import ModelStore
from gateway.config import AuthConfig, LimitsConfig, SourcesConfig
from gateway.scopes import LOOPBACK_SCOPES
from gateway.server import RunningServer

from .conftest import SCRIPT
from .fileserver import serve_payload
from .gateway_helpers import gateway, server_config


@pytest.fixture
async def running(
    tmp_path: Path, script_model: Path, eos_model: Path
) -> AsyncIterator[RunningServer]:
    manager = ModelManager(ModelStore(tmp_path / "models"))
    await manager.pull(str(eos_model))  # stored as "eos"
    config = server_config(
        tmp_path,
        {"script": script_model},
        limits=LimitsConfig(max_body_bytes=64 * 1024),
        # The tests' file server is on loopback, which pulls reach only when listed.
        sources=SourcesConfig(allow_hosts=["127.0.0.1"]),
    )
    async with gateway(config) as srv:
        yield srv


_clients: list[ollama.AsyncClient] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


def api(srv: RunningServer, token: str | None = "") -> ollama.AsyncClient:
    """An official client (closed after the test)."""
    if token == "":  # a user who may manage models (pull, create, copy, delete)
        token = srv.gateway.auth.issue_token(sub="alice", ttl=600, scopes=LOOPBACK_SCOPES)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = ollama.AsyncClient(host=srv.http_url, headers=headers)
    _clients.append(client)
    return client


GREEDY = {"temperature": 0, "num_predict": 13}


async def test_generate_and_chat(running: RunningServer) -> None:
    client = api(running)
    r = await client.generate(model="script", prompt="Say it", options=GREEDY)
    assert r.response == SCRIPT
    assert r.done and r.done_reason == "length"
    assert r.eval_count == 13 and r.prompt_eval_count and r.prompt_eval_count > 0
    assert r.total_duration and r.eval_duration and r.load_duration is not None
    assert r.total_duration >= r.eval_duration > 0

    c = await client.chat(
        model="eos", messages=[{"role": "user", "content": "hi"}], options={"temperature": 0}
    )
    assert c.message.role == "assistant" and c.message.content == "Done."
    assert c.done_reason == "stop"

    # raw prompts skip the chat template: fewer prompt tokens than the templated one.
    raw = await client.generate(model="script", prompt="Say it", raw=True, options=GREEDY)
    assert raw.response == SCRIPT
    assert raw.prompt_eval_count is not None and r.prompt_eval_count > raw.prompt_eval_count


async def test_streaming_matches_the_whole_answer(running: RunningServer) -> None:
    client = api(running)
    parts = []
    final = None
    async for chunk in await client.generate(
        model="script", prompt="Say it", options={"temperature": 0, "num_predict": 26}, stream=True
    ):
        if chunk.done:
            final = chunk
        else:
            parts.append(chunk.response)
    assert "".join(parts) == SCRIPT * 2
    assert final is not None and final.eval_count == 26 and final.response == ""

    chat_parts = []
    async for chunk in await client.chat(
        model="eos",
        messages=[{"role": "user", "content": "hi"}],
        options={"temperature": 0},
        stream=True,
    ):
        chat_parts.append(chunk.message.content)
    assert "".join(chat_parts) == "Done."


async def test_options_map_to_sampling(running: RunningServer) -> None:
    client = api(running)
    r = await client.generate(
        model="script", prompt="x", options={"temperature": 0, "num_predict": 40, "stop": ["你"]}
    )
    assert r.response == "Hi ö" and r.done_reason == "stop"
    a = await client.generate(
        model="script", prompt="x", options={"temperature": 1.5, "seed": 7, "num_predict": 8}
    )
    b = await client.generate(
        model="script", prompt="x", options={"temperature": 1.5, "seed": 7, "num_predict": 8}
    )
    assert a.response == b.response


async def test_model_management(running: RunningServer, eos_model: Path) -> None:
    client = api(running)
    tags = await client.list()
    assert [m.model for m in tags.models] == ["eos:latest"]
    assert tags.models[0].size == eos_model.stat().st_size and tags.models[0].digest

    shown = await client.show("eos")
    assert shown.modelfile and "FROM" in shown.modelfile
    assert shown.details and shown.details.format == "gguf"
    # What the file's own metadata says (the tiny model: a llama of ~0.3M parameters, F32).
    facts = facts_of(eos_model)
    assert shown.details.family == "llama" and shown.details.quantization_level == "F32"
    assert shown.details.parameter_size == facts.parameter_size != ""
    assert shown.capabilities == ["completion"]
    info = shown.modelinfo or {}
    assert info["general.architecture"] == "llama"
    assert info["general.parameter_count"] == facts.parameter_count > 0
    assert info["llama.context_length"] == facts.context_length > 0
    assert tags.models[0].details and tags.models[0].details.family == "llama"

    await client.copy("eos", "eos2")
    await client.create(model="terse", from_="eos", system="Be terse.", parameters={"seed": 3})
    shown = await client.show("terse")
    assert "Be terse." in (shown.modelfile or "") and "seed" in (shown.parameters or "")
    names = {m.model for m in (await client.list()).models}
    assert names == {"eos:latest", "eos2:latest", "terse:latest"}
    # A parameter no Modelfile can hold (an object) is a 400, not a failure on the server.
    odd = {"model": "odd", "from": "eos", "parameters": {"stop": {"a": 1}}}
    with pytest.raises(ollama.ResponseError) as bad:
        await client._request_raw("POST", "/api/create", json=odd)
    assert bad.value.status_code == 400 and "parameters" in str(bad.value)

    await client.generate(model="eos2", prompt="hi", keep_alive="10m")
    ps = await client.ps()
    assert "eos2:latest" in [m.model for m in ps.models]
    # An empty prompt with keep_alive 0 unloads, as in Ollama.
    unloaded = await client.generate(model="eos2", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "eos2:latest" not in [m.model for m in (await client.ps()).models]

    await client.delete("eos2")
    with pytest.raises(ollama.ResponseError) as e:
        await client.delete("eos2")
    assert e.value.status_code == 404
    version = await client._request_raw("GET", "/api/version")
    assert version.json() == {"version": running.gateway.version}


async def test_pull_reports_progress(running: RunningServer, eos_model: Path) -> None:
    data = eos_model.read_bytes()
    with serve_payload(data) as srv:
        running.gateway.models.manager.catalog["remote"] = CatalogEntry(source=srv.url)
        client = api(running)
        statuses = [p.status async for p in await client.pull("remote", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        r = await client.generate(model="remote", prompt="hi", options={"temperature": 0})
        assert r.response == "Done."
        with pytest.raises(ollama.ResponseError) as e:
            await client.pull("not-in-any-catalog")
        assert e.value.status_code == 404 and "catalog" in e.value.error


async def test_errors_have_the_ollama_shape(running: RunningServer) -> None:
    client = api(running)
    with pytest.raises(ollama.ResponseError) as e:
        await client.generate(model="nope", prompt="hi")
    assert e.value.status_code == 404 and "nope" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await client.generate(model="script", prompt="hi", options={"temperature": "hot"})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await client.chat(
            model="script",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            format="json",
        )
    assert e.value.status_code == 400 and "tools" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await client.generate(model="script", prompt="hi", template="{{ .Prompt }}")
    assert e.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as e:
        await api(running, token="not-a-token").generate(model="nope", prompt="hi")
    assert e.value.status_code == 404  # on loopback, a bad key is no worse than none

    def raw(body: bytes, path: str = "/api/generate") -> httpx.Response:
        token = running.gateway.auth.issue_token(sub="alice", ttl=60)
        return httpx.post(
            running.http_url + path,
            content=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )

    for body, status, words in (
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "JSON body"),
        (b'{"prompt": "x"}', 400, "model"),
        (b'{"model": "script", "prompt": 5}', 400, "prompt"),
        (b'{"model": "script", "keep_alive": "soon"}', 400, "keep_alive"),
        (json.dumps({"model": "script", "prompt": "x" * 100_000}).encode(), 413, "limit"),
    ):
        r = await asyncio.to_thread(raw, body)
        assert r.status_code == status, (body[:40], r.text)
        assert words in r.json()["error"], r.json()


async def test_error_mid_stream_is_an_error_line(running: RunningServer) -> None:
    """A failure after the stream began arrives as {"error": ...}, as Ollama sends it."""
    token = running.gateway.auth.issue_token(sub="alice", ttl=60)

    def stream() -> list[dict[str, Any]]:
        lines = []
        with httpx.stream(
            "POST",
            running.http_url + "/api/generate",
            json={"model": "script", "prompt": "x", "options": {"temperature": 0}},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ) as r:
            for line in r.iter_lines():
                lines.append(json.loads(line))
                if len(lines) == 3:
                    # The model is unloaded under the stream: its generation ends with an error.
                    asyncio.run_coroutine_threadsafe(
                        running.gateway.engine.unload("script"), loop
                    ).result()
        return lines

    loop = asyncio.get_running_loop()
    lines = await asyncio.to_thread(stream)
    assert lines[0]["response"] and lines[0]["done"] is False
    assert "error" in lines[-1] and "done" not in lines[-1]


async def test_loopback_clients_need_no_token_unless_turned_off(
    tmp_path: Path, eos_model: Path
) -> None:
    async with gateway(server_config(tmp_path, {"eos": eos_model})) as srv:
        r = await api(srv, token=None).generate(model="eos", prompt="hi")
        assert r.response == "Done."
        # A user with a key of its own is still that user on loopback (its scopes apply).
        reader = srv.gateway.auth.issue_token(sub="r", ttl=60)
        with pytest.raises(ollama.ResponseError) as e:
            await api(srv, token=reader).copy("eos", "eos2")
        assert e.value.status_code == 403

        def proxied() -> httpx.Response:
            return httpx.get(srv.http_url + "/api/tags", headers={"X-Forwarded-For": "10.0.0.9"})

        assert (await asyncio.to_thread(proxied)).status_code == 401
        # Only the compatible surfaces: native routes still need a credential.
        assert (await asyncio.to_thread(httpx.get, srv.http_url + "/v1/ps")).status_code == 401
    shared = AuthConfig(loopback_without_token=False)  # a shared machine
    async with gateway(server_config(tmp_path, {"eos": eos_model}, auth=shared)) as srv:
        with pytest.raises(ollama.ResponseError) as e:
            await api(srv, token=None).list()
        assert e.value.status_code == 401


async def test_embeddings(running: RunningServer) -> None:
    client = api(running)
    r = await client.embed(model="script", input=["first text", "second text"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == len(r.embeddings[1]) > 0
    assert abs(sum(x * x for x in r.embeddings[0]) - 1.0) < 1e-3  # unit length
    assert r.embeddings[0] != r.embeddings[1]
    assert r.prompt_eval_count and r.prompt_eval_count > 2
    again = await client.embed(model="script", input="first text")
    assert again.embeddings[0] == r.embeddings[0]
    legacy = await client.embeddings(model="script", prompt="first text")
    assert list(legacy.embedding) == r.embeddings[0]
    with pytest.raises(ollama.ResponseError) as e:
        await client.embed(model="script", input=[""])
    assert e.value.status_code == 400


async def test_a_client_that_leaves_a_stream_cancels_it(tmp_path: Path, slow_model: Path) -> None:
    async with gateway(server_config(tmp_path, {"slow": slow_model})) as srv:
        token = srv.gateway.auth.issue_token(sub="alice", ttl=60)
        async with (
            httpx.AsyncClient(base_url=srv.http_url) as c,
            c.stream(
                "POST",
                "/api/generate",
                json={"model": "slow", "prompt": "x", "options": {"temperature": 0}},
                headers={"Authorization": f"Bearer {token}"},
            ) as r,
        ):
            n = 0
            async for _line in r.aiter_lines():
                n += 1
                if n == 5:
                    break
        engine = srv.gateway.engine
        for _ in range(200):
            if not sum(w.active for w in (await engine.health()).workers):
                break
            await asyncio.sleep(0.05)
        made = sum(w.tokens_generated for w in (await engine.health()).workers)
        await asyncio.sleep(0.3)
        assert sum(w.tokens_generated for w in (await engine.health()).workers) == made
        assert made < 1000  # the slow model would have run to its 4096-token context


@pytest.mark.smollm2
async def test_structured_output_validates(tmp_path: Path, smollm2: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    async with gateway(server_config(tmp_path, {"smol": smollm2})) as srv:
        client = api(srv)
        r = await client.chat(
            model="smol",
            messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}],
            format=schema,
            options={"temperature": 0, "num_predict": 128},
        )
        person = json.loads(r.message.content)
        assert set(person) == {"name", "age"}
        assert isinstance(person["name"], str) and isinstance(person["age"], int)
        g = await client.generate(
            model="smol",
            prompt="List three colours as JSON.",
            format="json",
            options={"temperature": 0, "num_predict": 128},
        )
        assert isinstance(json.loads(g.response), dict | list)
