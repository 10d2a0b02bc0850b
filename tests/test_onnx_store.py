"""Importing through the ONNX converters: BERT folders and GGUF files become stored ONNX models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import EngineClient, EngineConfig, GenerateRequest, SamplingParams
from engine.onnx.bert_convert import convert_bert
from engine.onnx.encoder import OnnxEncoder
from engine.onnx.tinydecoder import write_tiny_decoder
from engine.store.errors import StoreError
from engine.store.pull import ModelManager, PullEvent
from engine.store.store import ModelStore
from engine.tinybert import write_tiny_bert

from .conftest import collect
from .test_cli import ferrous


async def test_a_sentence_transformers_folder_is_converted_on_import(tmp_path: Path) -> None:
    src = write_tiny_bert(tmp_path / "MiniBert", seed=1)
    mgr = ModelManager(ModelStore(tmp_path / "models"))
    record = await mgr.pull(str(src))
    assert record.manifest.format == "onnx"
    assert {"model.onnx", "tokenizer.json", "pooling.json"} <= {
        f.path for f in record.manifest.files
    }
    want = OnnxEncoder(convert_bert(src, tmp_path / "direct")).embed(["a b c", "hello world"])
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("bert", mgr.store.model_path(record))
        got = await client.embed("bert", ["a b c", "hello world"])
    assert np.allclose(np.array(got.vectors), want, atol=1e-5)


async def test_a_gguf_pulled_as_onnx_decodes_like_the_gguf(tmp_path: Path) -> None:
    twin = write_tiny_decoder(tmp_path / "twin", seed=2)
    mgr = ModelManager(ModelStore(tmp_path / "models"))
    events: list[PullEvent] = []
    record = await mgr.pull(
        "converted", source=str(twin / "model.gguf"), to_onnx="f32", progress=events.append
    )
    assert record.manifest.format == "onnx"
    assert "converting to ONNX" in [e.status for e in events]
    assert list(mgr.store.tmp.iterdir()) == []  # scratch folders are gone
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=16, ignore_eos=True)
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("onnx", mgr.store.model_path(record))
        await client.load("gguf", twin / "model.gguf")
        for prompt in ("The quick brown fox", "Once upon a time"):
            texts = []
            for model in ("onnx", "gguf"):
                deltas, _ = await collect(
                    client, GenerateRequest(model=model, prompt=prompt, sampling=greedy)
                )
                texts.append("".join(d.text for d in deltas))
            assert texts[0] == texts[1]
    # Pulling it again as GGUF is a different model format: it is fetched again, as gguf.
    again = await mgr.pull("converted", source=str(twin / "model.gguf"))
    assert again.manifest.format == "gguf"


async def test_conversion_failures_are_typed(tmp_path: Path) -> None:
    folder = tmp_path / "not-bert"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"junk")
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    mgr = ModelManager(ModelStore(tmp_path / "models"))
    with pytest.raises(StoreError) as e:
        await mgr.pull(str(folder))
    assert e.value.code.value == "bad_request" and "cannot convert" in e.value.message
    assert await mgr.models() == []
    assert list(mgr.store.tmp.iterdir()) == []


def test_cli_pull_onnx(tmp_path: Path) -> None:
    twin = write_tiny_decoder(tmp_path / "twin", seed=0)
    out = ferrous(tmp_path / "home", "pull", "tiny-onnx", str(twin / "model.gguf"), "--onnx")
    assert out.returncode == 0, out.stderr
    listed = ferrous(tmp_path / "home", "list")
    assert "tiny-onnx" in listed.stdout and "onnx" in listed.stdout.split("tiny-onnx", 1)[1]
