"""The ONNX backend through the real worker pool, cross-checked with llama.cpp on the same weights."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import onnx
import pytest

from engine import (
    ChatMessage,
    EngineClient,
    EngineConfig,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from engine.backends.onnx_entry import OnnxOptions
from engine.backends.onnxsession import session_options
from engine.onnx.tinydecoder import write_tiny_decoder
from engine.store.pull import ModelManager
from engine.store.store import ModelStore
from gateway.config import OnnxConfig
from protocol.errors import BadRequest, ModelLoadError

from .conftest import collect

PROMPTS = ["The quick brown fox", "Once upon a time there", "A small model says"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("onnx") / "tiny", seed=0)


def onnx_only(folder: Path, dst: Path) -> Path:
    """The ONNX model folder without its GGUF twin (what a user would import)."""
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.gguf"))
    return dst


@pytest.fixture
async def pool(tiny_folder: Path, tmp_path: Path) -> AsyncIterator[EngineClient]:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("onnx", onnx_only(tiny_folder, tmp_path / "m"))
        await client.load("gguf", tiny_folder / "model.gguf")
        yield client


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=n, ignore_eos=True)


async def text_of(client: EngineClient, request: GenerateRequest) -> tuple[str, list[int]]:
    deltas, done = await collect(client, request)
    assert done.error is None, done.error
    ids = [i for d in deltas for i in (d.token_ids or [])]
    return "".join(d.text for d in deltas), ids


async def test_greedy_tokens_agree_with_llama_cpp(pool: EngineClient) -> None:
    for prompt in PROMPTS:
        a, a_ids = await text_of(
            pool, GenerateRequest(model="onnx", prompt=prompt, sampling=greedy(20), token_ids=True)
        )
        b, b_ids = await text_of(
            pool, GenerateRequest(model="gguf", prompt=prompt, sampling=greedy(20), token_ids=True)
        )
        assert a_ids == b_ids, (prompt, a, b)
        assert a == b and len(a_ids) == 20


async def test_concurrent_generations_are_batched_and_equal_alone(pool: EngineClient) -> None:
    alone = [
        (await text_of(pool, GenerateRequest(model="onnx", prompt=p, sampling=greedy(24))))[0]
        for p in PROMPTS
    ]
    together = await asyncio.gather(
        *(
            text_of(pool, GenerateRequest(model="onnx", prompt=p, sampling=greedy(24)))
            for p in PROMPTS
        )
    )
    assert [t for t, _ in together] == alone


async def test_chat_template_sampling_and_refusals(pool: EngineClient) -> None:
    text, _ = await text_of(
        pool,
        GenerateRequest(
            model="onnx", messages=[ChatMessage("user", "Hello there")], sampling=greedy(8)
        ),
    )
    assert text
    seeded = SamplingParams(temperature=0.9, seed=11, top_k=20, max_tokens=16, ignore_eos=True)
    x, _ = await text_of(pool, GenerateRequest(model="onnx", prompt="Once", sampling=seeded))
    y, _ = await text_of(pool, GenerateRequest(model="onnx", prompt="Once", sampling=seeded))
    assert x == y
    with pytest.raises(BadRequest, match="JSON schema"):
        await collect(
            pool,
            GenerateRequest(model="onnx", prompt="x", sampling=SamplingParams(json_schema="{")),
        )
    # The pool still serves after a refusal; cancellation works as on GGUF.
    stream = pool.generate(GenerateRequest(model="onnx", prompt="x", sampling=greedy(200)))
    await anext(stream)
    await stream.aclose()
    _, done = await collect(pool, GenerateRequest(model="onnx", prompt="x", sampling=greedy(3)))
    assert done.finish_reason is FinishReason.LENGTH


async def test_bad_folders_are_typed_errors(
    pool: EngineClient, tiny_folder: Path, tmp_path: Path
) -> None:
    no_graph = onnx_only(tiny_folder, tmp_path / "no-graph")
    (no_graph / "model.onnx").unlink()
    no_tok = onnx_only(tiny_folder, tmp_path / "no-tok")
    (no_tok / "tokenizer.json").unlink()
    bad_tok = onnx_only(tiny_folder, tmp_path / "bad-tok")
    (bad_tok / "tokenizer.json").write_text("{not json")
    # A graph without a KV cache: drop the past inputs.
    no_cache = onnx_only(tiny_folder, tmp_path / "no-cache")
    model = onnx.load(str(no_cache / "model.onnx"))
    keep = [i for i in model.graph.input if not i.name.startswith("past_key_values.")]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, str(no_cache / "model.onnx"))
    future = onnx_only(tiny_folder, tmp_path / "opset")
    model = onnx.load(str(future / "model.onnx"))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 99  # an opset no runtime knows
    onnx.save(model, str(future / "model.onnx"))
    small_vocab = onnx_only(tiny_folder, tmp_path / "vocab")
    config = json.loads((small_vocab / "config.json").read_text())
    config["vocab_size"] = 100  # the tokenizer has more tokens than the model's logits
    (small_vocab / "config.json").write_text(json.dumps(config))
    truncated = onnx_only(tiny_folder, tmp_path / "cut")
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])
    cases = {
        no_graph: "not_onnx",
        no_tok: "tokenizer",
        bad_tok: "tokenizer",
        no_cache: "backend",
        truncated: "backend",
        future: "unsupported_opset",
        small_vocab: "tokenizer",
    }
    for folder, reason in cases.items():
        with pytest.raises(ModelLoadError) as e:
            await pool.load("bad", folder, backend="onnx")
        assert e.value.reason in (reason, "graph"), (folder.name, e.value)
        assert str(folder) in e.value.message
    _, done = await collect(pool, GenerateRequest(model="onnx", prompt="x", sampling=greedy(2)))
    assert done.error is None


async def test_onnx_folders_import_into_the_store_and_serve(
    tiny_folder: Path, tmp_path: Path
) -> None:
    src = onnx_only(tiny_folder, tmp_path / "my-onnx")
    mgr = ModelManager(ModelStore(tmp_path / "models"))
    record = await mgr.pull(str(src))
    assert record.manifest.format == "onnx"
    path = mgr.store.model_path(record)
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        info = await client.load("stored", path)
        assert info.size > 0
        text, _ = await text_of(
            client, GenerateRequest(model="stored", prompt=PROMPTS[0], sampling=greedy(5))
        )
        assert text


def test_threads_spin_within_a_run_and_stop_when_it_returns() -> None:
    """On by default, spinning lasts only while a run is under way: between steps and when
    idle, a worker's threads sleep and leave the cores to the gateway and other workers."""
    default = session_options(2, OnnxOptions())
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert default.get_session_config_entry("session.force_spinning_stop") == "1"
    quiet = session_options(2, OnnxOptions(spinning=False))
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # The configuration file's default is the engine's.
    assert OnnxConfig().spinning is OnnxOptions().spinning


async def test_session_options_apply_and_are_checked(tiny_folder: Path, tmp_path: Path) -> None:
    folder = onnx_only(tiny_folder, tmp_path / "m")
    want = None
    for options in (
        OnnxOptions(),
        OnnxOptions(spinning=True, graph_optimization="basic", memory_arena=False),
    ):
        config = EngineConfig(workers=1, threads_per_worker=1, options={"onnx": options})
        async with EngineClient(config) as client:
            await client.load("m", folder)
            text, _ = await text_of(
                client, GenerateRequest(model="m", prompt=PROMPTS[1], sampling=greedy(12))
            )
            want = want or text
            assert text == want
    config = EngineConfig(
        workers=1,
        threads_per_worker=1,
        options={"onnx": OnnxOptions(graph_optimization="fastest")},
    )
    async with EngineClient(config) as client:
        with pytest.raises(BadRequest, match="graph_optimization"):
            await client.load("m", folder)
