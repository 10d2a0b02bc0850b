"""Quantizing on create: llama.cpp's quantizer through the store, the CLI's library call and
Ollama's ``/api/create`` (the official client), on a tiny f32 model the project writes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import ollama
import pytest

from engine import EngineClient, EngineConfig, GenerateRequest, SamplingParams
from engine.modelfacts import facts_of
from engine.store.errors import StoreError
from engine.store.pull import ModelManager
from engine.store.store import ModelStore
from engine.tinymodels import TinyLlamaSpec, write_tiny_llama
from gateway.config import SourcesConfig
from gateway.scopes import LOOPBACK_SCOPES
from gateway.server import RunningServer

from .gateway_helpers import gateway, server_config

# K-quants work on rows of 256 values: a tiny model that wide takes every type.
SPEC = TinyLlamaSpec(n_embd=256, n_head=4, n_ff=512)


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("q") / "tiny-f32.gguf", spec=SPEC)


async def _greedy(path: Path) -> str:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as engine:
        await engine.load("m", path)
        request = GenerateRequest(
            model="m", prompt="hello", sampling=SamplingParams(temperature=0, max_tokens=8)
        )
        return "".join([d.text async for d in engine.generate(request) if hasattr(d, "text")])


async def test_quantized_models_are_smaller_load_and_say_what_they_are(
    tmp_path: Path, f32_model: Path
) -> None:
    manager = ModelManager(ModelStore(tmp_path / "models"))
    base = await manager.pull("base", source=str(f32_model))
    events: list[str] = []
    sizes = {}
    # Names in any case, as Ollama takes them; stored under llama.cpp's spelling.
    for qtype, shown, spelled in (("q8_0", "Q8_0", "q8_0"), ("Q4_K_M", "Q4_K_M", "q4_K_M")):
        record = await manager.create(
            f"tiny-{qtype.lower()}",
            "FROM base\nPARAMETER temperature 0.3\n",
            quantize=qtype,
            progress=lambda e: events.append(e.status),
        )
        path = manager.store.model_path(record)
        assert facts_of(path).quantization == shown
        assert record.manifest.parameters["temperature"] == 0.3
        assert record.manifest.files[0].path.endswith(f".{spelled}.gguf")
        sizes[shown] = record.size
        assert await _greedy(path)  # it loads and answers
    assert sizes["Q4_K_M"] < sizes["Q8_0"] < base.size / 3
    assert any(e.startswith("quantizing F32 to q8_0") for e in events)
    # The unquantized original is still there, unchanged.
    assert facts_of(manager.store.model_path(base)).quantization == "F32"


async def test_quantize_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    manager = ModelManager(ModelStore(tmp_path / "models"))
    quantized = write_tiny_llama(tmp_path / "q8.gguf", dtype="q8_0", spec=SPEC)
    await manager.pull("q8", source=str(quantized))
    await manager.pull("f32", source=str(write_tiny_llama(tmp_path / "f.gguf", spec=SPEC)))
    for base, qtype, why in (
        ("q8", "q4_K_M", "already quantized (Q8_0)"),
        ("f32", "q9_9", "unknown quantization type"),
        # The type is checked before FROM is read (a pull could be gigabytes) ...
        ("nowhere-such", "q9_9", "unknown quantization type"),
        # ... and a file imported only to be quantized does not stay behind.
        (str(quantized), "q4_K_M", "already quantized (Q8_0)"),
    ):
        with pytest.raises(StoreError) as err:
            await manager.create("out", f"FROM {base}\n", quantize=qtype)
        assert err.value.reason == "invalid" and why in err.value.message
    assert {r.ref.short for r in await manager.models()} == {"q8", "f32"}
    assert not any(manager.store.tmp.iterdir())  # nothing left behind


@pytest.fixture
async def running(tmp_path: Path, f32_model: Path) -> AsyncIterator[RunningServer]:
    manager = ModelManager(ModelStore(tmp_path / "models"))
    await manager.pull("base", source=str(f32_model))
    config = server_config(tmp_path, {}, sources=SourcesConfig(allow_hosts=["127.0.0.1"]))
    async with gateway(config) as srv:
        yield srv


async def test_ollama_create_quantizes(running: RunningServer) -> None:
    token = running.gateway.auth.issue_token(sub="alice", ttl=600, scopes=LOOPBACK_SCOPES)
    client = ollama.AsyncClient(host=running.http_url, headers={"Authorization": f"Bearer {token}"})
    try:
        await client.create(model="small", from_="base", quantize="q8_0")
        shown = await client.show("small")
        assert shown.details is not None and shown.details.quantization_level == "Q8_0"
        answer = await client.generate(model="small", prompt="hi", options={"num_predict": 4})
        assert answer.done
        with pytest.raises(ollama.ResponseError) as err:
            await client.create(model="again", from_="small", quantize="q4_K_M")
        assert err.value.status_code == 400 and "already quantized" in str(err.value)
    finally:
        await client.close()


async def test_onnx_q4_converts_to_the_4bit_onnx_graph(tmp_path: Path) -> None:
    """``onnx-q4``: the same option gives the ONNX backend's 4-bit graph (from a GGUF the
    converter reads: a byte-level BPE vocabulary), which loads and answers."""
    from engine.onnx.tinydecoder import write_tiny_decoder

    gguf = write_tiny_decoder(tmp_path / "dec") / "model.gguf"
    manager = ModelManager(ModelStore(tmp_path / "models"))
    await manager.pull("base", source=str(gguf))
    record = await manager.create("tiny-onnx", "FROM base\n", quantize="ONNX-Q4")
    assert record.manifest.format == "onnx"
    path = manager.store.model_path(record)
    assert facts_of(path).quantization == "Q4 (MatMulNBits)"
    assert await _greedy(path)
