"""ONNX encoders served by the engine pool and the HTTP embeddings APIs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine import EngineClient, EngineConfig, GenerateRequest
from engine.onnx.bert_convert import convert_bert
from engine.onnx.encoder import OnnxEncoder
from engine.tinybert import write_tiny_bert
from protocol.errors import BadRequest

from .conftest import collect
from .gateway_helpers import gateway, server_config

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "stocks fell today"]


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bert")
    return convert_bert(write_tiny_bert(root / "src", seed=0), root / "onnx")


async def test_the_pool_serves_an_onnx_encoder(encoder_folder: Path) -> None:
    want = OnnxEncoder(encoder_folder).embed(TEXTS)
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("enc", encoder_folder)
        got = await client.embed("enc", TEXTS)
        assert np.allclose(np.array(got.vectors), want, atol=1e-5)
        assert got.prompt_tokens > len(TEXTS)
        with pytest.raises(BadRequest, match="embedding model"):
            await collect(client, GenerateRequest(model="enc", prompt="hello"))
        with pytest.raises(BadRequest, match="empty"):
            await client.embed("enc", ["ok", ""])
        again = await client.embed("enc", TEXTS[:1])
        assert np.allclose(again.vectors[0], want[0], atol=1e-5)


async def test_http_embeddings_from_an_onnx_encoder(encoder_folder: Path, tmp_path: Path) -> None:
    async with gateway(server_config(tmp_path, {"enc": encoder_folder})) as srv:
        token = srv.gateway.auth.issue_token(sub="alice", ttl=60)
        headers = {"Authorization": f"Bearer {token}"}

        def call() -> tuple[httpx.Response, httpx.Response]:
            with httpx.Client(base_url=srv.http_url, headers=headers, timeout=30) as c:
                ollama = c.post("/api/embed", json={"model": "enc", "input": TEXTS})
                openai = c.post("/v1/embeddings", json={"model": "enc", "input": TEXTS})
                return ollama, openai

        ollama, openai = await asyncio.to_thread(call)
        assert ollama.status_code == 200 and openai.status_code == 200, (ollama.text, openai.text)
        a = np.array(ollama.json()["embeddings"])
        b = np.array([d["embedding"] for d in openai.json()["data"]])
        assert a.shape == b.shape == (3, OnnxEncoder(encoder_folder).dim)
        assert np.allclose(a, b, atol=1e-6)
