"""Backpressure, stall timeout and cancellation through the real worker pool."""

from __future__ import annotations

import asyncio
from pathlib import Path

from engine import (
    EngineClient,
    EngineConfig,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    TokenDelta,
)
from engine.rings import MIN_CAPACITY

from .conftest import SCRIPT, collect

SCRIPT_TOKENS = 13


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "repeat_penalty": 1.0, **kw})  # type: ignore[arg-type]


def expected_text(n_tokens: int) -> str:
    """Text of the first n tokens of the script stream (the script is 13 tokens)."""
    prefix_tokens = ["H", "i", " ", "", "ö", "", "", "你", "", "", "", "🙂", "!"]
    full, rest = divmod(n_tokens, SCRIPT_TOKENS)
    return SCRIPT * full + "".join(prefix_tokens[:rest])


async def worker_progress(client: EngineClient) -> tuple[int, int, int]:
    """(tokens generated, active generations, RSS) summed over the pool."""
    h = await client.health()
    return (
        sum(w.tokens_generated for w in h.workers),
        sum(w.active for w in h.workers),
        sum(w.rss_bytes for w in h.workers),
    )


async def wait_idle(client: EngineClient, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while (await worker_progress(client))[1]:
            await asyncio.sleep(0.01)


async def test_a_consumer_that_stops_reading_pauses_the_worker_without_loss(
    script_model: Path,
) -> None:
    config = EngineConfig(workers=1, threads_per_worker=1, ring_capacity=MIN_CAPACITY)
    async with EngineClient(config) as client:
        await client.load("script", script_model)
        request = GenerateRequest(
            model="script", prompt="x", sampling=greedy(max_tokens=1500), token_ids=True
        )
        stream = client.generate(request)
        first = await anext(stream)
        assert isinstance(first, TokenDelta)
        # Paused: the worker holds the generation but makes no tokens while the ring is
        # full. (How soon it fills depends on the machine's load: wait until it has.)
        made_a, active_a, rss_a = await worker_progress(client)
        async with asyncio.timeout(30):
            while True:
                await asyncio.sleep(0.5)
                made_b, active_b, rss_b = await worker_progress(client)
                if made_b == made_a:
                    break
                made_a, active_a, rss_a = made_b, active_b, rss_b
        assert active_a == active_b == 1
        assert made_a == made_b < 1500
        assert abs(rss_b - rss_a) < 1 << 20
        events = [first] + [ev async for ev in stream]
        deltas = [e for e in events if isinstance(e, TokenDelta)]
        done = events[-1]
        assert not isinstance(done, TokenDelta)
        assert done.finish_reason is FinishReason.LENGTH and done.usage.completion_tokens == 1500
        assert [d.seq for d in deltas] == list(range(len(deltas)))
        assert "".join(d.text for d in deltas) == expected_text(1500)
        assert sum(len(d.token_ids or []) for d in deltas) == 1500


async def test_a_stalled_consumer_gets_the_generation_ended_as_stalled(script_model: Path) -> None:
    config = EngineConfig(
        workers=1, threads_per_worker=1, ring_capacity=MIN_CAPACITY, stall_timeout=0.5
    )
    async with EngineClient(config) as client:
        await client.load("script", script_model)
        stream = client.generate(
            GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=1500))
        )
        first = await anext(stream)
        await asyncio.sleep(1.5)
        assert (await worker_progress(client))[1] == 0  # the worker let go of it
        events = [first] + [ev async for ev in stream]
        done = events[-1]
        assert not isinstance(done, TokenDelta)
        assert done.finish_reason is FinishReason.STALLED
        text = "".join(e.text for e in events if isinstance(e, TokenDelta))
        # What arrived is what was made, in order; the step that found the ring full is dropped.
        made = expected_text(done.usage.completion_tokens)
        assert made.startswith(text) and len(made) - len(text) <= 2
        # The worker is free for the next request.
        _, done = await collect(
            client, GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=4))
        )
        assert done.finish_reason is FinishReason.LENGTH


async def test_cancel_stops_the_worker_within_one_step(slow_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("slow", slow_model)
        request = GenerateRequest(
            model="slow", prompt="x", sampling=greedy(max_tokens=3000), token_ids=True
        )
        received = 0
        cancelled_at = -1
        done = None
        async for ev in client.generate(request):
            if isinstance(ev, TokenDelta):
                received += len(ev.token_ids or [])
                if received >= 40 and cancelled_at < 0:
                    cancelled_at = received
                    assert await client.cancel(request.request_id)
            else:
                done = ev
        assert done is not None and done.finish_reason is FinishReason.CANCELLED
        # The worker reads control messages before every step, so it stops at the
        # step in progress when the cancel arrives. How far it ran ahead of this
        # reader before that depends on the machine's load (a step takes a few ms;
        # a loaded CI runner delays the reader by tens of ms), so the bound allows
        # seconds of delay: a third of the 3,000-token budget that a cancel which
        # did not stop the worker would reach.
        assert received <= done.usage.completion_tokens <= cancelled_at + 1000
        assert not await client.cancel(request.request_id)  # already over
        made, active, _ = await worker_progress(client)
        assert active == 0
        await asyncio.sleep(0.2)
        assert (await worker_progress(client))[0] == made
        # The worker serves the next request at once.
        deltas, done = await collect(
            client, GenerateRequest(model="slow", prompt="x", sampling=greedy(max_tokens=13))
        )
        assert "".join(d.text for d in deltas) == SCRIPT
        assert done.timings.queue_ms < 1000


async def test_closing_the_iterator_cancels_the_generation(slow_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("slow", slow_model)
        stream = client.generate(
            GenerateRequest(model="slow", prompt="x", sampling=greedy(max_tokens=3000))
        )
        for _ in range(20):
            await anext(stream)
        await stream.aclose()
        await wait_idle(client)
        made, _, _ = await worker_progress(client)
        assert made < 3000
        await asyncio.sleep(0.2)
        assert (await worker_progress(client))[0] == made


async def test_cancelling_the_consumer_task_cancels_the_generation(slow_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("slow", slow_model)
        seen = asyncio.Event()

        async def consume() -> None:
            async for _ in client.generate(
                GenerateRequest(model="slow", prompt="x", sampling=greedy(max_tokens=3000))
            ):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_idle(client)
        made, _, _ = await worker_progress(client)
        assert made < 3000
        await asyncio.sleep(0.2)
        assert (await worker_progress(client))[0] == made


async def test_cancelling_a_queued_generation(slow_model: Path) -> None:
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=1)
    async with EngineClient(config) as client:
        await client.load("slow", slow_model)
        running = client.generate(
            GenerateRequest(model="slow", prompt="x", sampling=greedy(max_tokens=200))
        )
        await anext(running)
        queued = GenerateRequest(model="slow", prompt="x", sampling=greedy(max_tokens=200))
        queued_stream = client.generate(queued)
        task = asyncio.create_task(anext(queued_stream))
        await asyncio.sleep(0.05)
        assert await client.cancel(queued.request_id)
        done = await task
        assert not isinstance(done, TokenDelta)
        assert done.finish_reason is FinishReason.CANCELLED and done.usage.completion_tokens == 0
        await queued_stream.aclose()
        rest = [ev async for ev in running]
        assert rest[-1].finish_reason is FinishReason.LENGTH  # type: ignore[union-attr]
