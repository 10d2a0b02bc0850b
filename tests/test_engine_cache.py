"""The engine's loaded-model cache: memory budget, LRU eviction, keep_alive (real workers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine import EngineClient, EngineConfig, GenerateRequest, SamplingParams, TokenDelta
from engine.backends.gguf_entry import check_model_file
from engine.memory import estimate_model_bytes
from protocol.errors import ModelNotFound, Overloaded, TooLarge

from .conftest import collect


@pytest.fixture
async def pool() -> AsyncIterator[EngineClient]:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        yield client


def greedy(max_tokens: int | None = 4) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


async def worker_models(client: EngineClient) -> list[str]:
    """What the worker process itself says it holds (not just the gateway's books)."""
    return sorted((await client.health()).workers[0].models)


async def wait_until_unloaded(client: EngineClient, name: str, within: float) -> float:
    t0 = time.monotonic()
    while name in client.models():
        assert time.monotonic() - t0 < within, f"{name} is still loaded"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def test_least_recently_used_idle_model_is_evicted(
    pool: EngineClient, script_model: Path
) -> None:
    a = await pool.load("a", script_model)
    pool.memory_budget = 2 * a.size + a.size // 2  # room for two models, not three
    await pool.load("b", script_model)
    await collect(pool, GenerateRequest(model="a", prompt="x", sampling=greedy()))  # a is newer
    await pool.load("c", script_model)
    assert pool.models() == ["a", "c"]
    assert await worker_models(pool) == ["a", "c"]  # b really left the worker
    # The evicted model answers with a typed error, not a hang.
    with pytest.raises(ModelNotFound):
        await collect(pool, GenerateRequest(model="b", prompt="x", sampling=greedy()))


async def test_a_model_with_running_generations_is_never_evicted(
    pool: EngineClient, script_model: Path
) -> None:
    a = await pool.load("a", script_model)
    pool.memory_budget = 2 * a.size + a.size // 2
    # A long generation on "a" that stays open (its reader pauses after one delta).
    stream = pool.generate(GenerateRequest(model="a", prompt="x", sampling=greedy(None)))
    first = await anext(stream)
    assert isinstance(first, TokenDelta)
    await pool.load("b", script_model)
    await collect(pool, GenerateRequest(model="b", prompt="x", sampling=greedy()))
    await pool.load("c", script_model)  # "a" is least recently loaded but busy: "b" goes
    assert pool.models() == ["a", "c"]
    # With both loaded models busy there is no room, and the load is refused, retryably.
    busy = pool.generate(GenerateRequest(model="c", prompt="y", sampling=greedy(None)))
    await anext(busy)
    with pytest.raises(Overloaded) as e:
        await pool.load("d", script_model)
    assert e.value.retryable and "running generations" in e.value.message
    assert pool.models() == ["a", "c"]
    assert {x.name: x.active for x in pool.loaded()} == {"a": 1, "c": 1}
    await stream.aclose()
    await busy.aclose()
    assert {x.name: x.active for x in pool.loaded()} == {"a": 0, "c": 0}
    await pool.load("d", script_model)  # idle now: the least recently used ("a") goes
    assert pool.models() == ["c", "d"]


async def test_a_model_larger_than_the_budget_is_refused(
    pool: EngineClient, script_model: Path
) -> None:
    await pool.load("a", script_model)
    # Sequence windows shrink to fit a smaller budget; one window is the least a model takes.
    header = check_model_file(str(script_model), "llama_cpp")
    pool.memory_budget = estimate_model_bytes(header, n_ctx=0, workers=1, n_seq=1) - 1
    with pytest.raises(TooLarge) as e:
        await pool.load("b", script_model)
    assert "memory budget" in e.value.message
    assert pool.models() == ["a"]  # nothing was evicted for a model that can never fit


async def test_keep_alive_zero_unloads_after_the_request(
    pool: EngineClient, script_model: Path
) -> None:
    await pool.load("a", script_model)
    events = await collect(
        pool, GenerateRequest(model="a", prompt="x", sampling=greedy(), keep_alive=0)
    )
    assert events[-1].finish_reason.value == "length"
    await wait_until_unloaded(pool, "a", within=15.0)
    assert await worker_models(pool) == []


async def test_keep_alive_duration_and_forever(pool: EngineClient, script_model: Path) -> None:
    await pool.load("short", script_model)
    await pool.load("kept", script_model, keep_alive=-1)
    asked = time.monotonic()  # before the generation ends, so before its keep-alive starts
    await collect(
        pool, GenerateRequest(model="short", prompt="x", sampling=greedy(), keep_alive=3.0)
    )
    [short] = [x for x in pool.loaded() if x.name == "short"]
    assert short.expires_at is not None and 0 < short.expires_at - time.time() <= 3.0
    [kept] = [x for x in pool.loaded() if x.name == "kept"]
    assert kept.expires_at is None and kept.size > 0
    await wait_until_unloaded(pool, "short", within=15.0)
    # Never before its keep_alive (a slow machine only makes it later).
    assert time.monotonic() - asked >= 3.0
    assert pool.models() == ["kept"]
    await asyncio.sleep(1.2)
    assert pool.models() == ["kept"]


async def test_default_keep_alive_applies_to_loads(script_model: Path) -> None:
    config = EngineConfig(workers=1, threads_per_worker=1, keep_alive=0.5)
    async with EngineClient(config) as client:
        await client.load("a", script_model)
        await wait_until_unloaded(client, "a", within=15.0)
        # A generation keeps it loaded while it runs, and restarts the clock after.
        await client.load("a", script_model)
        stream = client.generate(GenerateRequest(model="a", prompt="x", sampling=greedy(None)))
        await anext(stream)
        await asyncio.sleep(1.5)
        assert "a" in client.models()
        await stream.aclose()
        await wait_until_unloaded(client, "a", within=15.0)
