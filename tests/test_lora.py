"""LoRA adapters: a tiny adapter the project writes changes a tiny model's output exactly as
the merged weights predict, and sequences with different adapters (or none) share one loaded
base model in one worker, each getting its own answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import pytest

from engine import EngineClient, EngineConfig, GenerateRequest, SamplingParams
from engine.backends.llamalora import lora_key, step_group
from engine.requests import Adapter
from engine.store.pull import ModelManager
from engine.store.store import ModelStore
from engine.tinylora import write_tiny_lora
from engine.tinymodels import write_tiny_llama
from gateway.scopes import LOOPBACK_SCOPES
from gateway.server import RunningServer
from protocol import messages as m

from .conftest import collect
from .gateway_helpers import client, gateway, server_config

PROMPT = "the cat is on the"
N = 24


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=N, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base, two adapters, and the base with each merged in (at scale 1 and 0.5)."""
    d = tmp_path_factory.mktemp("lora")
    base = write_tiny_llama(d / "base.gguf")
    one, d1 = write_tiny_lora(d / "one.gguf", seed=1)
    two, d2 = write_tiny_lora(d / "two.gguf", seed=2, targets=("attn_v", "ffn_up"))
    return {
        "base": base,
        "one": one,
        "two": two,
        "merged-one": write_tiny_llama(d / "m1.gguf", deltas=d1),
        "merged-half": write_tiny_llama(
            d / "mh.gguf", deltas={k: np.float32(0.5) * v for k, v in d1.items()}
        ),
        "merged-two": write_tiny_llama(d / "m2.gguf", deltas=d2),
    }


async def _text(client: EngineClient, model: str, adapters: list[Adapter] | None = None) -> str:
    request = GenerateRequest(
        model=model, prompt=PROMPT, sampling=greedy(), adapters=adapters or []
    )
    deltas, done = await collect(client, request)
    assert done.usage.completion_tokens == N
    return "".join(d.text for d in deltas)


async def test_adapters_equal_their_merged_weights_and_share_one_base(
    models: dict[str, Path],
) -> None:
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=4)
    async with EngineClient(config) as client:
        for name in ("base", "merged-one", "merged-half", "merged-two"):
            await client.load(name, models[name])
        want = {name: await _text(client, name) for name in models if name.startswith(("m", "b"))}
        assert len(set(want.values())) == 4  # every adapter changes the answer

        one = Adapter(str(models["one"]))
        half = Adapter(str(models["one"]), scale=0.5)
        two = Adapter(str(models["two"]))
        # One at a time, on the one loaded base.
        assert await _text(client, "base", [one]) == want["merged-one"]
        assert await _text(client, "base", [half]) == want["merged-half"]
        assert await _text(client, "base", [two]) == want["merged-two"]
        assert await _text(client, "base") == want["base"]
        # All at once, in one worker: each its own answer, none stepping on the others'
        # cached prompt (the same prompt under different adapters is not the same cache).
        got = await asyncio.gather(
            _text(client, "base", [one]),
            _text(client, "base", [two]),
            _text(client, "base"),
            _text(client, "base", [half]),
        )
        assert got == [want["merged-one"], want["merged-two"], want["base"], want["merged-half"]]


async def test_a_file_that_is_not_an_adapter_for_the_model_is_a_bad_request(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from engine.tinymodels import TinyLlamaSpec
    from protocol.errors import BadRequest

    other, _ = write_tiny_lora(tmp_path / "other.gguf", spec=TinyLlamaSpec(n_embd=32, n_ff=64))
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=2)
    async with EngineClient(config) as client:
        await client.load("base", models["base"])
        for wrong in (models["merged-one"], other):  # a model, and another model's adapter
            with pytest.raises(BadRequest, match="adapter"):
                await _text(client, "base", [Adapter(str(wrong))])
        # The worker goes on: the next request, with a good adapter, is answered.
        assert await _text(client, "base", [Adapter(str(models["one"]))])


def test_adapter_sets_take_turns() -> None:
    a, b = (("x", 1.0),), (("y", 0.5),)
    assert lora_key([Adapter("x"), Adapter("y", 0.0)]) == a
    assert lora_key([Adapter("x", 0.25), Adapter("x", 0.75)]) == a
    assert [step_group([a, (), a, b], t) for t in range(4)] == [a, (), b, a]
    assert step_group([(), ()], 7) == ()


# -- through the store and the server ---------------------------------------------------

OPTIONS = {"temperature": 0, "repeat_penalty": 1, "max_tokens": N, "ignore_eos": True}


@pytest.fixture
async def served(models: dict[str, Path], tmp_path: Path) -> AsyncIterator[RunningServer]:
    """The base in the store, ``bot`` and ``bot-two`` made FROM it with ADAPTER, and the
    merged models (the expected answers) as configured models."""
    manager = ModelManager(ModelStore(tmp_path / "models"))
    await manager.pull("base", source=str(models["base"]))
    await manager.create("bot", f"FROM base\nADAPTER {models['one']}\n")
    await manager.create("bot-two", f"FROM base\nADAPTER {models['two']}\n")
    merged = {k: v for k, v in models.items() if k.startswith("merged")}
    async with gateway(server_config(tmp_path, merged)) as srv:
        yield srv


async def _generate(srv: RunningServer, body: dict[str, Any]) -> httpx.Response:
    token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
    async with httpx.AsyncClient(
        base_url=srv.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        return await c.post("/v1/generate", json={"prompt": PROMPT, "options": OPTIONS, **body})


async def test_models_made_with_adapter_and_per_request_adapters_on_one_base(
    served: RunningServer,
) -> None:
    want = {}
    for name in ("merged-one", "merged-half", "merged-two"):
        r = await _generate(served, {"model": name})
        want[name] = r.json()["text"]
    r = await _generate(served, {"model": "bot"})
    assert r.status_code == 200 and r.json()["text"] == want["merged-one"]
    r = await _generate(served, {"model": "base", "adapters": [{"name": "bot-two"}]})
    assert r.json()["text"] == want["merged-two"]
    r = await _generate(served, {"model": "bot", "adapters": [{"name": "bot", "scale": 0.5}]})
    assert r.json()["text"] == want["merged-half"]
    r = await _generate(served, {"model": "bot", "adapters": []})  # the model's own, off
    base_text = r.json()["text"]
    assert base_text not in want.values()
    assert (await _generate(served, {"model": "base"})).json()["text"] == base_text

    # bot and bot-two run on base's loaded weights: one model in the engine, not three.
    loaded = set(served.gateway.engine.models())
    assert "base:latest" in loaded and not any(k.startswith("bot") for k in loaded)

    # Over the WebSocket, several at once: each its own answer.
    token = served.gateway.auth.issue_token(sub="alice", ttl=600)
    async with client(served, token) as ws:
        asks = {
            "g1": ("bot", None),
            "g2": ("base", [m.AdapterChoice("bot-two")]),
            "g3": ("base", None),
            "g4": ("base", [m.AdapterChoice("bot", 0.5)]),
        }
        for gid, (model, adapters) in asks.items():
            await ws.send(
                m.Generate(
                    id=gid,
                    model=model,
                    prompt=PROMPT,
                    options=m.Options(**OPTIONS),  # type: ignore[arg-type]
                    adapters=adapters,
                )
            )
        texts = {gid: "" for gid in asks}
        done: set[str] = set()
        while done != set(asks):
            msg = await ws.recv()
            if isinstance(msg, m.Delta):
                texts[msg.id] += msg.text
            elif isinstance(msg, m.Done):
                done.add(msg.id)
            else:
                assert not isinstance(msg, m.Error), msg
    assert texts == {
        "g1": want["merged-one"],
        "g2": want["merged-two"],
        "g3": base_text,
        "g4": want["merged-half"],
    }

    # What cannot be: typed 400s, and the server goes on.
    for body, words in (
        ({"model": "base", "adapters": [{"name": "base"}]}, "not a model with an adapter"),
        ({"model": "merged-one", "adapters": [{"name": "bot"}]}, "GGUF models of the store"),
        ({"model": "base", "adapters": [{"name": "bot", "scale": 9}]}, "adapters"),
    ):
        r = await _generate(served, body)
        assert r.status_code == 400 and words in r.text, (body, r.text)
    assert (await _generate(served, {"model": "bot"})).json()["text"] == want["merged-one"]


async def test_adapters_are_refused_unless_they_are_loras_for_the_model(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from engine.store.errors import StoreError
    from engine.tinymodels import TinyLlamaSpec

    manager = ModelManager(ModelStore(tmp_path / "models"))
    await manager.pull("base", source=str(models["base"]))
    made = await manager.create("bot", f"FROM base\nADAPTER {models['one']}\n")
    assert [a.path for a in made.manifest.adapters] == ["one.gguf"]
    # A model FROM one with an adapter keeps it, and may stack another.
    more = await manager.create("bot-more", f"FROM bot\nADAPTER {models['two']}\n")
    assert len(more.manifest.adapters) == 2
    for adapter, words in (
        (models["merged-one"], "not a LoRA adapter"),  # a model, not an adapter
        (tmp_path / "nothing.gguf", "does not exist"),
    ):
        with pytest.raises(StoreError, match=words):
            await manager.create("bad", f"FROM base\nADAPTER {adapter}\n")
    assert not any(manager.store.tmp.iterdir())  # nothing staged stays behind
    assert {r.ref.short for r in await manager.models()} == {"base", "bot", "bot-more"}
    # The blobs are kept by the store's collection while a model names them.
    assert made.manifest.adapters[0].digest not in manager.store.gc()
    # An adapter for a differently sized model of the same architecture is refused when
    # a generation first uses it (llama.cpp checks the shapes), as a typed bad request.
    narrow, _ = write_tiny_lora(tmp_path / "narrow.gguf", spec=TinyLlamaSpec(n_embd=32, n_ff=64))
    await manager.create("narrow", f"FROM base\nADAPTER {narrow}\n")
    async with gateway(server_config(tmp_path, {})) as srv:
        r = await _generate(srv, {"model": "narrow"})
        assert r.status_code == 400 and "adapter" in r.text
        assert str(tmp_path) not in r.text  # no server paths in what a client reads


async def test_ollama_create_with_uploaded_blobs(models: dict[str, Path], tmp_path: Path) -> None:
    """Ollama's way: ``create_blob`` uploads the files, ``create`` names them by digest in
    ``files`` and ``adapters``; a blob whose bytes do not match its digest is refused."""
    merged = {"merged-one": models["merged-one"]}
    async with gateway(server_config(tmp_path, merged)) as srv:
        token = srv.gateway.auth.issue_token(sub="alice", ttl=600, scopes=LOOPBACK_SCOPES)
        headers = {"Authorization": f"Bearer {token}"}
        client_ = ollama.AsyncClient(host=srv.http_url, headers=headers)
        try:
            base = await client_.create_blob(models["base"])
            lora = await client_.create_blob(models["one"])
            await client_.create(model="tuned", files={"base.gguf": base}, adapters={"a": lora})
            options = {"temperature": 0, "repeat_penalty": 1, "num_predict": N}
            got = await client_.generate(model="tuned", prompt=PROMPT, options=options)
            want = await client_.generate(model="merged-one", prompt=PROMPT, options=options)
            assert got.response == want.response
            shown = await client_.show("tuned")
            assert shown.modelfile is not None and f"ADAPTER {lora}" in shown.modelfile
            # The Modelfile shown makes the same model again.
            await client_.create(model="again", from_="tuned")
            again = await client_.generate(model="again", prompt=PROMPT, options=options)
            assert again.response == want.response
        finally:
            await client_.close()
        async with httpx.AsyncClient(base_url=srv.http_url, headers=headers) as c:
            wrong = "sha256:" + "0" * 64
            r = await c.post(f"/api/blobs/{wrong}", content=b"not those bytes")
            assert r.status_code == 400 and "do not match" in r.text
            r = await c.head(f"/api/blobs/{wrong}")
            assert r.status_code == 404
            reader = srv.gateway.auth.issue_token(sub="bob", ttl=600)  # no models:write
            r = await c.post(
                f"/api/blobs/{wrong}",
                content=b"x",
                headers={"Authorization": f"Bearer {reader}"},
            )
            assert r.status_code == 403


async def test_the_python_client_chooses_adapters(served: RunningServer) -> None:
    from ferrous_client import BadRequest as ClientBadRequest
    from ferrous_client import FerrousClient

    want = (await _generate(served, {"model": "merged-half"})).json()["text"]
    token = served.gateway.auth.issue_token(sub="alice", ttl=600)
    async with FerrousClient(served.ws_url, token=token) as c:
        gen = c.generate("base", PROMPT, options=OPTIONS, adapters=[("bot", 0.5)])
        assert "".join([d.text async for d in gen]) == want
        with pytest.raises(ClientBadRequest):
            c.generate("base", PROMPT, adapters=[("bot", 40.0)])  # checked before sending
