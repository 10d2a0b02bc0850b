"""Vision language models: a GGUF text model with its projector reads images in a chat.

The tiny model and projector the project writes (engine.tinyprojector) run
through llama.cpp's own multimodal library: an image changes the answer, the
same image gives the same answer, and generations with and without images
share one worker. Through the server, Ollama's ``images`` on chat and generate
reach the model (the official client), a model made with two FROM lines (or
Ollama's ``files``) is one, and a text model refuses images with a clear error.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import ollama
import pytest
from PIL import Image

from engine import ChatMessage, EngineClient, EngineConfig, GenerateRequest, SamplingParams
from engine.images import for_vision_model
from engine.modelfacts import facts_of
from engine.store.errors import StoreError
from engine.store.pull import ModelManager
from engine.store.store import ModelStore
from engine.tinymodels import write_tiny_llama
from engine.tinyprojector import write_tiny_vlm
from gateway.scopes import LOOPBACK_SCOPES
from gateway.server import RunningServer
from protocol.errors import BadRequest

from .gateway_helpers import gateway, server_config

N = 12


def _png(color: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm")


def _ask(model: str, image: bytes | None) -> GenerateRequest:
    images = None if image is None else [for_vision_model(image)]
    return GenerateRequest(
        model=model,
        messages=[ChatMessage("user", "what is this?", images=images)],
        sampling=SamplingParams(temperature=0, repeat_penalty=1, max_tokens=N, ignore_eos=True),
    )


async def _text(client: EngineClient, request: GenerateRequest) -> str:
    out = []
    async for ev in client.generate(request):
        if hasattr(ev, "text"):
            out.append(ev.text)
        else:
            assert ev.usage.completion_tokens == N
    return "".join(out)


async def test_images_change_the_answer_and_share_the_worker(vlm: Path, tmp_path: Path) -> None:
    assert "vision" in facts_of(vlm).capabilities
    text_model = write_tiny_llama(tmp_path / "text.gguf")
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=4)
    async with EngineClient(config) as client:
        await client.load("vlm", vlm)
        await client.load("text", text_model)
        red = await _text(client, _ask("vlm", _png("red")))
        green = await _text(client, _ask("vlm", _png("green")))
        plain = await _text(client, _ask("vlm", None))
        assert len({red, green, plain}) == 3
        assert await _text(client, _ask("vlm", _png("red"))) == red  # the same image again
        # Together in one worker, each its own answer (images decoded beside the others).
        got = await asyncio.gather(
            _text(client, _ask("vlm", _png("green"))),
            _text(client, _ask("vlm", None)),
            _text(client, _ask("vlm", _png("red"))),
        )
        assert got == [green, plain, red]
        # Two images in one turn take their places in the prompt (with the default repeat
        # penalty: image positions are no tokens to penalise).
        two = GenerateRequest(
            model="vlm",
            messages=[
                ChatMessage(
                    "user", "compare", images=[for_vision_model(_png(c)) for c in ("red", "blue")]
                )
            ],
            sampling=SamplingParams(temperature=0, max_tokens=N, ignore_eos=True),
        )
        assert await _text(client, two) not in (red, plain)
        sampled = msgspec.structs.replace(two, sampling=SamplingParams(max_tokens=N, seed=1))
        assert await _text(client, sampled)  # the sampler chain's penalty too
        with pytest.raises(BadRequest, match="cannot read images"):
            await _text(client, _ask("text", _png("red")))
        # The worker goes on.
        assert await _text(client, _ask("vlm", _png("red"))) == red


@pytest.fixture
async def served(vlm: Path, tmp_path: Path) -> AsyncIterator[RunningServer]:
    text_model = write_tiny_llama(tmp_path / "text.gguf")
    async with gateway(server_config(tmp_path, {"vlm": vlm, "text": text_model})) as srv:
        yield srv


async def test_ollama_images_reach_a_vision_model(served: RunningServer, vlm: Path) -> None:
    config = EngineConfig(workers=1, threads_per_worker=1)
    async with EngineClient(config) as engine:
        await engine.load("vlm", vlm)
        want = await _text(engine, _ask("vlm", _png("red")))
    token = served.gateway.auth.issue_token(sub="alice", ttl=600, scopes=LOOPBACK_SCOPES)
    headers = {"Authorization": f"Bearer {token}"}
    client = ollama.AsyncClient(host=served.http_url, headers=headers)
    options = {"temperature": 0, "repeat_penalty": 1, "num_predict": N}
    try:
        answer = await client.chat(
            model="vlm",
            messages=[{"role": "user", "content": "what is this?", "images": [_png("red")]}],
            options=options,
        )
        assert answer.message.content == want
        made = await client.generate(
            model="vlm", prompt="what is this?", images=[_png("green")], options=options
        )
        assert made.response and made.response != want
        with pytest.raises(ollama.ResponseError) as err:
            await client.chat(
                model="text",
                messages=[{"role": "user", "content": "?", "images": [_png("red")]}],
            )
        assert err.value.status_code == 400 and "cannot read images" in str(err.value)
    finally:
        await client.close()
    # OpenAI's image parts (data URLs) reach it the same way.
    import openai

    url = "data:image/png;base64," + base64.b64encode(_png("red")).decode()
    oai = openai.AsyncOpenAI(base_url=served.http_url + "/v1", api_key=token)
    try:
        done = await oai.chat.completions.create(
            model="vlm",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
            temperature=0,
            max_tokens=N,
            extra_body={"repeat_penalty": 1},
        )
        assert done.choices[0].message.content == want
        with pytest.raises(openai.BadRequestError) as bad_url:
            await oai.chat.completions.create(
                model="vlm",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                        ],
                    }
                ],
            )
        assert "data:image" in str(bad_url.value)
    finally:
        await oai.close()
    async with httpx.AsyncClient(base_url=served.http_url, headers=headers, timeout=60) as c:
        bad = base64.b64encode(b"\x89PNG\r\n\x1a\n-truncated").decode()
        for images, status, words in (
            ([bad], 400, "image 0"),
            ([base64.b64encode(_png("red")).decode()] * 9, 413, "at most 8"),
        ):
            r = await c.post(
                "/api/chat",
                json={"model": "vlm", "stream": False, "messages": [
                    {"role": "user", "content": "?", "images": images}
                ]},
            )  # fmt: skip
            assert r.status_code == status and words in r.text, r.text
        r = await c.post(
            "/api/generate",
            json={"model": "vlm", "prompt": "?", "raw": True, "images": [bad], "stream": False},
        )
        assert r.status_code == 400 and "raw" in r.text


async def test_a_vision_model_is_made_from_two_froms_or_two_uploaded_files(
    vlm: Path, tmp_path: Path
) -> None:
    manager = ModelManager(ModelStore(tmp_path / "models"))
    await manager.pull("text", source=str(vlm / "model.gguf"))
    made = await manager.create("seeing", f"FROM text\nFROM {vlm / 'projector.gguf'}\n")
    assert [f.path for f in made.manifest.files] == ["model.gguf", "projector.gguf"]
    assert "vision" in facts_of(manager.store.model_path(made)).capabilities
    for second, words in (
        (vlm / "model.gguf", "vision projector"),  # a model where the projector goes
        (tmp_path / "nothing.gguf", "does not exist"),
    ):
        with pytest.raises(StoreError, match=words):
            await manager.create("bad", f"FROM text\nFROM {second}\n")
    with pytest.raises(StoreError, match="already"):
        await manager.create("bad", f"FROM seeing\nFROM {vlm / 'projector.gguf'}\n")

    async with gateway(server_config(tmp_path, {})) as srv:
        token = srv.gateway.auth.issue_token(sub="alice", ttl=600, scopes=LOOPBACK_SCOPES)
        client = ollama.AsyncClient(host=srv.http_url, headers={"Authorization": f"Bearer {token}"})
        try:
            model = await client.create_blob(vlm / "model.gguf")
            projector = await client.create_blob(vlm / "projector.gguf")
            await client.create(
                model="uploaded", files={"mmproj.gguf": projector, "model.gguf": model}
            )
            options = {"temperature": 0, "repeat_penalty": 1, "num_predict": N}
            asks = [{"role": "user", "content": "what is this?", "images": [_png("red")]}]
            a = await client.chat(model="uploaded", messages=asks, options=options)
            b = await client.chat(model="seeing", messages=asks, options=options)
            assert a.message.content == b.message.content != ""
            shown = await client.show("uploaded")
            assert "vision" in (shown.capabilities or [])
        finally:
            await client.close()


async def test_websocket_chats_show_images_and_keep_them_for_later_turns(
    served: RunningServer,
) -> None:
    """Images on a WebSocket chat turn (base64 in JSON, binary in MessagePack) reach the
    vision model as Ollama's do, the conversation keeps them for the next turn, and a
    text model refuses them without ending the session."""
    from ferrous_client import BadRequest as ClientBadRequest
    from ferrous_client import FerrousClient

    token = served.gateway.auth.issue_token(sub="alice", ttl=600, scopes=LOOPBACK_SCOPES)
    headers = {"Authorization": f"Bearer {token}"}
    options = {"temperature": 0, "repeat_penalty": 1, "num_predict": N}
    red = _png("red")
    client = ollama.AsyncClient(host=served.http_url, headers=headers)
    try:
        first = {"role": "user", "content": "what is this?", "images": [red]}
        want = (await client.chat(model="vlm", messages=[first], options=options)).message
        follow = {"role": "user", "content": "and again?"}
        history = [first, {"role": "assistant", "content": want.content}, follow]
        want_next = (await client.chat(model="vlm", messages=history, options=options)).message
        plain = await client.chat(
            model="vlm", messages=[{"role": "user", "content": "what is this?"}], options=options
        )
    finally:
        await client.close()
    assert want.content != plain.message.content

    ws_options = {"temperature": 0, "repeat_penalty": 1, "max_tokens": N, "ignore_eos": True}
    for subprotocol in ("json", "msgpack"):
        async with FerrousClient(served.ws_url, token=token, subprotocol=subprotocol) as c:
            ask = {"role": "user", "content": "what is this?", "images": [red]}
            gen = c.chat("vlm", [ask], options=ws_options)
            assert await gen.collect() == want.content, subprotocol
            # The next turn names no image: the conversation still shows the first one.
            again = c.chat("vlm", "and again?", conversation=gen.conversation, options=ws_options)
            assert await again.collect() == want_next.content, subprotocol
            with pytest.raises(ClientBadRequest, match="cannot read images"):
                await c.chat("text", [ask], options=ws_options).collect()
            truncated = {"role": "user", "content": "?", "images": [red[:40]]}
            with pytest.raises(ClientBadRequest, match="image 0"):
                await c.chat("vlm", [truncated], options=ws_options).collect()
            # The session goes on; data URLs and files named by path are taken too.
            url = "data:image/png;base64," + base64.b64encode(red).decode()
            by_url = c.chat("vlm", [{**ask, "images": [url]}], options=ws_options)
            assert await by_url.collect() == want.content


def test_ferrous_run_sends_the_images_a_message_names(vlm: Path, tmp_path: Path) -> None:
    """As Ollama's CLI: paths of image files in a message are taken out of its text and
    sent as its images (a photo too large for one frame is scaled down first); a path
    that is no file stays text."""
    import os
    import subprocess
    import sys

    import numpy as np

    red, green, photo = tmp_path / "red.png", tmp_path / "my green.png", tmp_path / "photo.png"
    red.write_bytes(_png("red"))
    green.write_bytes(_png("green"))
    noise = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photo)
    assert photo.stat().st_size > 4 * 1024 * 1024  # past the 1 MiB frame as it is

    def run(message: str) -> subprocess.CompletedProcess[str]:
        argv = ["run", str(vlm), message, "--temperature", "0", "--max-tokens", "8"]
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", *argv, "--port", "1"],
            capture_output=True,
            text=True,
            env={**os.environ, "FERROUS_HOME": str(tmp_path / "home")},
            timeout=120,
            check=False,
        )

    outs = [
        run(f"what is this? {red}"),
        run(f"what is this? '{green}'"),
        run("what is this?"),
        run(f"what is this? {photo}"),
        run(f"what is this? {tmp_path / 'missing.png'}"),
    ]
    for out in outs:
        assert out.returncode == 0, out.stderr
    texts = [out.stdout.strip() for out in outs]
    assert "Added image" in outs[0].stderr and "Added image" in outs[1].stderr
    assert len(set(texts[:4])) == 4  # each picture its own answer, none without one
    assert "Added image" not in outs[4].stderr and texts[4] != texts[2]  # the path is text
