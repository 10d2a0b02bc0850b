"""Crashed workers and bad model files: typed errors, recovery, nothing leaked."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import gguf
import pytest

from engine import (
    EngineClient,
    EngineConfig,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    TokenDelta,
)
from engine.tinymodels import write_tiny_llama
from protocol.errors import EngineError, ErrorCode, ModelLoadError

from .conftest import SCRIPT, collect, ring_segments


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "repeat_penalty": 1.0, **kw})  # type: ignore[arg-type]


async def test_sigkill_ends_in_flight_generations_and_the_pool_recovers(slow_model: Path) -> None:
    # One sequence per worker, so the second generation waits for the slot (engine queue).
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1)
    async with EngineClient(config) as client:
        await client.load("slow", slow_model)
        streams = [
            client.generate(
                GenerateRequest(model="slow", prompt="x", sampling=greedy(max_tokens=3000))
            )
            for _ in range(2)
        ]
        first = await anext(streams[0])  # running
        assert isinstance(first, TokenDelta)
        second = asyncio.ensure_future(anext(streams[1]))  # waits for the only slot
        while client.queued("slow") < 1:
            await asyncio.sleep(0.01)
        (victim,) = (await client.health()).workers
        assert victim.active == 1 and victim.queued == 0  # the worker's own queue stays empty
        assert len(ring_segments()) == 1  # a waiting request holds no ring yet

        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        ends = []
        async for ev in streams[0]:
            if not isinstance(ev, TokenDelta):
                ends.append(ev)
        queued_end = await second  # the queued one never produced a token
        assert not isinstance(queued_end, TokenDelta)
        ends.append(queued_end)
        elapsed = time.monotonic() - killed_at
        assert [ev async for ev in streams[1]] == []
        assert len(ends) == 2
        for ev in ends:
            assert ev.finish_reason is FinishReason.ERROR
            assert (
                ev.error is not None
                and ev.error.code == ErrorCode.ENGINE_ERROR
                and ev.error.retryable
            )
        # Noticed by the dead control socket, not by the watchdog (health_timeout: 120 s);
        # the bound is loose so that a loaded machine cannot flip it.
        assert elapsed < 10.0
        assert ring_segments() == set()  # the gateway owns and unlinked the ring

        # A replacement starts, reloads the model, and serves.
        async with asyncio.timeout(60):
            while True:
                health = await client.health()
                if health.restarts == 1 and health.ok and health.workers[0].models == ["slow"]:
                    break
                await asyncio.sleep(0.05)
        assert health.workers[0].pid != victim.pid
        deltas, done = await collect(
            client, GenerateRequest(model="slow", prompt="x", sampling=greedy(max_tokens=13))
        )
        assert (
            "".join(d.text for d in deltas) == SCRIPT and done.finish_reason is FinishReason.LENGTH
        )
    assert ring_segments() == set()


async def test_requests_during_a_restart_wait_for_the_replacement(script_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("script", script_model)
        pid = (await client.health()).workers[0].pid
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
        deltas, _ = await collect(
            client, GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=13))
        )
        assert "".join(d.text for d in deltas) == SCRIPT


def _unsupported_arch(path: Path, good: bytes) -> Path:
    needle = b"\x05\x00\x00\x00\x00\x00\x00\x00llama"  # the first length-prefixed "llama": the architecture
    path.write_bytes(good.replace(needle, b"\x05\x00\x00\x00\x00\x00\x00\x00lmama", 1))
    return path


def _no_tensors(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a"])
    w.add_token_types([2, 3, 3, 1])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "missing"),
        ("empty", "empty"),
        ("text", "not_gguf"),
        ("header_cut", "truncated"),
        ("data_cut", "truncated"),
        ("garbage_counts", "corrupt"),
        ("unsupported_arch", "unsupported_architecture"),
        ("no_tensors", "backend"),
        ("directory", "not_gguf"),
    ],
)
async def test_bad_model_files_give_typed_errors_and_the_pool_survives(
    tmp_path: Path, script_model: Path, case: str, reason: str
) -> None:
    good = script_model.read_bytes()
    path = tmp_path / f"{case}.gguf"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is not a model\n" * 10)
    elif case == "header_cut":
        path.write_bytes(good[:200])
    elif case == "data_cut":
        path.write_bytes(good[: len(good) // 2])
    elif case == "garbage_counts":
        path.write_bytes(good[:8] + b"\xff" * 16 + good[24:])
    elif case == "unsupported_arch":
        _unsupported_arch(path, good)
    elif case == "no_tensors":
        _no_tensors(path)
    elif case == "directory":
        path.mkdir()
    async with EngineClient(
        EngineConfig(workers=1, threads_per_worker=1, load_timeout=60)
    ) as client:
        with pytest.raises(ModelLoadError) as info:
            await client.load("bad", path)
        err = info.value
        assert err.path == str(path) and err.reason == reason
        assert str(path) in str(err)
        assert err.code == (
            ErrorCode.MODEL_NOT_FOUND if case == "missing" else ErrorCode.ENGINE_ERROR
        )
        # No worker died, and the pool still loads and serves a good model.
        await client.load("script", script_model)
        deltas, _ = await collect(
            client, GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=2))
        )
        assert "".join(d.text for d in deltas) == "Hi"
        health = await client.health()
        assert health.ok and health.restarts == 0 and health.workers[0].models == ["script"]


async def test_a_worker_that_misses_the_handshake_fails_start_up() -> None:
    client = EngineClient(EngineConfig(workers=1, threads_per_worker=1, start_timeout=0.001))
    with pytest.raises(EngineError, match="did not start"):
        await client.start()


async def test_unload_then_generate_is_model_not_found(tmp_path: Path) -> None:
    from protocol.errors import ModelNotFound

    path = write_tiny_llama(tmp_path / "u.gguf", script="Ok!")
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("u", path)
        await client.unload("u")
        assert (await client.health()).workers[0].models == []
        with pytest.raises(ModelNotFound):
            await collect(client, GenerateRequest(model="u", prompt="x"))
