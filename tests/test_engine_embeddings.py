"""Embeddings through a real worker pool: shapes, norms, determinism, errors, and sharing a worker."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from engine import (
    EngineClient,
    EngineConfig,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    TokenDelta,
)
from engine.backends import LoadParams, available_backends
from engine.backends.llamacpp import LlamaCppBackend
from engine.tinymodels import TinyLlamaSpec
from protocol.errors import BadRequest, ModelNotFound

from .conftest import SCRIPT, collect

N_EMBD = TinyLlamaSpec().n_embd  # the script model's width (conftest changes only n_ctx)
N_CTX = 2048  # the script model's context


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "repeat_penalty": 1.0, **kw})  # type: ignore[arg-type]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


@pytest.fixture
async def pool(script_model: Path) -> AsyncIterator[EngineClient]:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("script", script_model)
        yield client


async def test_vectors_have_the_model_width_and_unit_length(pool: EngineClient) -> None:
    texts = ["Hello there", "the cat is on the mat", "Hi ö你🙂!"]
    result = await pool.embed("script", texts)
    assert result.model == "script"
    assert len(result.vectors) == len(texts)
    assert all(len(v) == N_EMBD for v in result.vectors)
    for v in result.vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-5)


async def test_vectors_are_deterministic_and_tell_texts_apart(pool: EngineClient) -> None:
    a, b, a_again = (await pool.embed("script", ["the cat", "you and it", "the cat"])).vectors
    assert a == a_again  # same text, another sequence of the same batch
    assert (await pool.embed("script", ["the cat"])).vectors[0] == a  # and another call
    assert a != b
    assert cosine(a, b) < 1.0 - 1e-6


async def test_prompt_tokens_count_what_was_read(pool: EngineClient) -> None:
    one = await pool.embed("script", ["hello world"])
    two = await pool.embed("script", ["hello world", "is it"])
    alone = await pool.embed("script", ["is it"])
    assert two.prompt_tokens == one.prompt_tokens + alone.prompt_tokens
    # The same count a generation reports for that text as its prompt (BOS included).
    _, done = await collect(
        pool, GenerateRequest(model="script", prompt="hello world", sampling=greedy(max_tokens=1))
    )
    assert one.prompt_tokens == done.usage.prompt_tokens


async def test_long_inputs_are_truncated_or_refused(pool: EngineClient) -> None:
    long_text = "word " * 3000  # far more than 2048 tokens
    cut = await pool.embed("script", [long_text, "x"])
    assert cut.prompt_tokens == N_CTX + (await pool.embed("script", ["x"])).prompt_tokens
    assert len(cut.vectors) == 2
    with pytest.raises(BadRequest, match="input 1 is longer than the context"):
        await pool.embed("script", ["x", long_text], truncate=False)


async def test_many_inputs_span_several_batches(pool: EngineClient) -> None:
    texts = [f"text number {i} " * (1 + i % 40) for i in range(40)]
    result = await pool.embed("script", texts)
    assert len(result.vectors) == 40
    for i in (0, 19, 39):
        alone = (await pool.embed("script", [texts[i]])).vectors[0]
        assert cosine(result.vectors[i], alone) > 1.0 - 1e-5


async def test_errors_are_typed_and_the_pool_keeps_working(pool: EngineClient) -> None:
    with pytest.raises(BadRequest, match="no inputs"):
        await pool.embed("script", [])
    with pytest.raises(BadRequest, match="input 1 is empty"):
        await pool.embed("script", ["x", ""])
    with pytest.raises(ModelNotFound):
        await pool.embed("nope", ["x"])
    with pytest.raises(BadRequest, match="longer than the context"):
        await pool.embed("script", ["word " * 3000], truncate=False)
    health = await pool.health()
    assert health.ok and health.restarts == 0
    assert len((await pool.embed("script", ["still here"])).vectors) == 1
    deltas, _ = await collect(
        pool, GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=13))
    )
    assert "".join(d.text for d in deltas) == SCRIPT


async def test_embedding_while_a_generation_streams_in_the_same_worker(
    pool: EngineClient,
) -> None:
    expected = (await pool.embed("script", ["the cat", "and you"])).vectors
    rounds = 100  # 1,300 tokens: within the 2,048-token context
    request = GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=13 * rounds))
    text: list[str] = []
    embedded: list[list[list[float]]] = []
    reason: FinishReason | None = None
    async for event in pool.generate(request):
        if isinstance(event, TokenDelta):
            text.append(event.text)
            if len(text) == 5:  # mid-stream: the one worker is decoding this generation
                assert (await pool.health()).workers[0].active == 1
                results = await asyncio.gather(
                    pool.embed("script", ["the cat", "and you"]),
                    pool.embed("script", ["the cat"]),
                )
                embedded = [r.vectors for r in results]
        else:
            reason = event.finish_reason
    assert "".join(text) == SCRIPT * rounds
    assert reason is FinishReason.LENGTH
    assert embedded == [expected, expected[:1]]


async def test_a_long_embedding_request_does_not_stall_running_streams(slow_model: Path) -> None:
    """The worker runs one embedding pass per decode step, as it reads long prompts in chunks."""
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("slow", slow_model)
        stamps: list[float] = []
        text: list[str] = []

        async def stream() -> None:
            request = GenerateRequest(model="slow", prompt="x", sampling=greedy(max_tokens=13 * 40))
            async for event in client.generate(request):
                if isinstance(event, TokenDelta):
                    stamps.append(time.perf_counter())
                    text.append(event.text)

        task = asyncio.create_task(stream())
        while not stamps:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        result = await client.embed("slow", ["word " * 300] * 3)  # ~1,200 tokens each: chunks
        t1 = time.perf_counter()
        await task
        assert len(result.vectors) == 3 and result.prompt_tokens > 3000
        assert len([t for t in stamps if t0 < t < t1]) >= 3  # the stream moved meanwhile
        assert "".join(text) == SCRIPT * 40


async def test_unloading_the_model_ends_a_running_embedding_request(slow_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("slow", slow_model)
        task = asyncio.create_task(client.embed("slow", ["word " * 300] * 8))
        await asyncio.sleep(0.3)  # the worker is part-way through it
        await client.unload("slow")
        with pytest.raises(ModelNotFound, match="unloaded during the request"):
            await task
        health = await client.health()
        assert health.ok and health.restarts == 0
        await client.load("slow", slow_model)
        assert len((await client.embed("slow", ["x"])).vectors) == 1


@pytest.mark.ctransformers
@pytest.mark.skipif(
    "ctransformers" not in available_backends(), reason="ctransformers not installed"
)
async def test_ctransformers_has_no_embeddings(script_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("ct", script_model, backend="ctransformers")
        with pytest.raises(BadRequest, match="embeddings need the llama_cpp backend"):
            await client.embed("ct", ["x"])


@pytest.mark.smollm2
async def test_smollm2_embeddings_place_similar_sentences_closer(smollm2: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("smollm2", smollm2)
        cat, sitting, stocks = (
            await client.embed(
                "smollm2",
                [
                    "The cat sat on the mat.",
                    "A cat was sitting on a mat.",
                    "Stock markets fell sharply today.",
                ],
            )
        ).vectors
        assert len(cat) == 576  # SmolLM2-135M's hidden size
        assert cosine(cat, sitting) > cosine(cat, stocks)


@pytest.mark.smollm2
def test_chunked_pooling_matches_llama_cpp_mean_pooling(smollm2: Path) -> None:
    """The backend reads a long input in chunks and pools with numpy; llama.cpp pools in one go.

    With SmolLM2 a chunk is a few hundred tokens, so a ~700-token input spans
    several decodes (its later chunks attend to the earlier ones through the KV
    cache); the result must match llama.cpp's own mean pooling of a single pass.
    """
    texts = ["The cat sat on the mat.", "A long story. " + "It went on and on. " * 120]
    backend = LlamaCppBackend.load(str(smollm2), LoadParams(n_threads=1))
    try:
        # One call per text: llama.cpp's results move slightly (cosine ~0.9995 for
        # SmolLM2 Q4_1) with how many tokens share a decode, whoever pools.
        results = [backend.embed([t], True) for t in texts]
        ours = [vectors[0] for vectors, _ in results]
        tokens = [backend.tokenize(t) for t in texts]
        assert [n for _, n in results] == [len(t) for t in tokens] and len(tokens[1]) > 600
        model = backend._model  # the same weights, a reference context pooling by itself
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 1024
        params.n_threads = params.n_threads_batch = 1
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        ctx = llama_cpp.llama_init_from_model(model, params)
        batch = llama_cpp.llama_batch_init(1024, 0, 1)
        try:
            for ids, got in zip(tokens, ours, strict=True):
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                for i, tok in enumerate(ids):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                batch.n_tokens = len(ids)
                assert llama_cpp.llama_decode(ctx, batch) == 0
                ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                want = np.ctypeslib.as_array(ptr, shape=(len(got),)).astype(np.float64)
                assert cosine(got, list(want / np.linalg.norm(want))) > 0.9999
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
    finally:
        backend.free()
