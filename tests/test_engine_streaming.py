"""Streaming through the real worker pool: order, determinism, stops, limits, UTF-8."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import (
    ChatMessage,
    EngineClient,
    EngineConfig,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from protocol.errors import BadRequest, ModelNotFound

from .conftest import SCRIPT, collect

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "repeat_penalty": 1.0, **kw})  # type: ignore[arg-type]


async def test_deltas_arrive_in_order_and_spell_the_output(engine: EngineClient) -> None:
    deltas, done = await collect(
        engine,
        GenerateRequest(
            model="script", prompt="Say it", sampling=greedy(max_tokens=39), token_ids=True
        ),
    )
    assert [d.seq for d in deltas] == list(range(len(deltas)))
    assert "".join(d.text for d in deltas) == SCRIPT * 3
    assert done.finish_reason is FinishReason.LENGTH
    assert done.usage.completion_tokens == 39 == sum(len(d.token_ids or []) for d in deltas)
    assert done.usage.prompt_tokens > 0
    t = done.timings
    assert t.load_ms > 0 and t.ttft_ms > 0 and t.total_ms >= t.ttft_ms and t.decode_tok_s > 0


async def test_multibyte_characters_are_never_split_across_deltas(engine: EngineClient) -> None:
    deltas, _ = await collect(
        engine,
        GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=13), token_ids=True),
    )
    texts = [d.text for d in deltas]
    assert "ö" in texts and "你" in texts and "🙂" in texts  # each arrives whole
    assert "\ufffd" not in "".join(texts)
    by_text = {d.text: d.token_ids for d in deltas}
    assert len(by_text["你"] or []) == 3 and len(by_text["🙂"] or []) == 4


async def test_stop_sequence_split_across_tokens_ends_without_leaking(engine: EngineClient) -> None:
    # "你🙂" spans 7 byte tokens; the output must stop right before it.
    deltas, done = await collect(
        engine,
        GenerateRequest(model="script", prompt="x", sampling=greedy(stop=["你🙂"], max_tokens=100)),
    )
    assert "".join(d.text for d in deltas) == "Hi ö"
    assert done.finish_reason is FinishReason.STOP
    deltas, done = await collect(
        engine,
        GenerateRequest(
            model="script", prompt="x", sampling=greedy(stop=["!Hi ö"], max_tokens=100)
        ),
    )
    assert "".join(d.text for d in deltas) == "Hi ö你🙂"
    assert done.finish_reason is FinishReason.STOP


async def test_partial_stop_text_is_released_at_max_tokens(engine: EngineClient) -> None:
    # Ends on "Hi" which is a prefix of the stop string: it must still be delivered.
    deltas, done = await collect(
        engine,
        GenerateRequest(
            model="script", prompt="x", sampling=greedy(stop=["Hi there"], max_tokens=2)
        ),
    )
    assert "".join(d.text for d in deltas) == "Hi"
    assert done.finish_reason is FinishReason.LENGTH


async def test_end_of_sequence_token_finishes_with_stop(eos_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("eos", eos_model)
        deltas, done = await collect(
            client, GenerateRequest(model="eos", prompt="x", sampling=GREEDY)
        )
        assert "".join(d.text for d in deltas) == "Done."
        assert done.finish_reason is FinishReason.STOP
        assert done.usage.completion_tokens == 5
        deltas, done = await collect(
            client,
            GenerateRequest(
                model="eos", prompt="x", sampling=greedy(ignore_eos=True, max_tokens=8)
            ),
        )
        assert done.finish_reason is FinishReason.LENGTH and done.usage.completion_tokens == 8


async def test_the_context_window_ends_a_generation_with_length(eos_model: Path) -> None:
    # eos_model has a 512-token context; with EOS ignored it runs until the window is full.
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("eos", eos_model)
        _, done = await collect(
            client, GenerateRequest(model="eos", prompt="x", sampling=greedy(ignore_eos=True))
        )
        assert done.finish_reason is FinishReason.LENGTH
        # The last token is sampled from position 511 and never needs a position itself.
        assert done.usage.prompt_tokens + done.usage.completion_tokens - 1 == 512


async def test_a_seed_makes_sampling_repeatable(random_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=2, threads_per_worker=1)) as client:
        await client.load("random", random_model)

        async def sample(seed: int) -> str:
            sampling = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=seed, max_tokens=40)
            deltas, done = await collect(
                client, GenerateRequest(model="random", prompt="Once", sampling=sampling)
            )
            assert done.usage.completion_tokens == 40
            return "".join(d.text for d in deltas)

        first = await sample(1234)
        assert await sample(1234) == first  # same seed, possibly another worker
        assert await sample(1234) == first
        assert await sample(99) != first


async def test_chat_messages_use_the_model_template(engine: EngineClient) -> None:
    messages = [ChatMessage("user", "Hello")]
    deltas, done = await collect(
        engine, GenerateRequest(model="script", messages=messages, sampling=greedy(max_tokens=13))
    )
    assert "".join(d.text for d in deltas) == SCRIPT
    rendered = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    _, raw = await collect(
        engine, GenerateRequest(model="script", prompt=rendered, sampling=greedy(max_tokens=1))
    )
    assert done.usage.prompt_tokens == raw.usage.prompt_tokens


async def test_concurrent_generations_are_independent(engine: EngineClient) -> None:
    import asyncio

    results = await asyncio.gather(
        *(
            collect(
                engine,
                GenerateRequest(
                    model="script", prompt=f"p{i}", sampling=greedy(max_tokens=13 * (i + 1))
                ),
            )
            for i in range(5)
        )
    )
    for i, (deltas, done) in enumerate(results):
        assert "".join(d.text for d in deltas) == SCRIPT * (i + 1)
        assert done.finish_reason is FinishReason.LENGTH


async def test_unknown_model_and_bad_prompts_raise_typed_errors(engine: EngineClient) -> None:
    with pytest.raises(ModelNotFound):
        await collect(engine, GenerateRequest(model="nope", prompt="x"))
    with pytest.raises(BadRequest, match="prompt or messages"):
        await collect(engine, GenerateRequest(model="script"))
    with pytest.raises(BadRequest, match="context window"):
        await collect(engine, GenerateRequest(model="script", prompt="word " * 3000))
    # The pool still serves normal requests afterwards.
    deltas, _ = await collect(
        engine, GenerateRequest(model="script", prompt="x", sampling=greedy(max_tokens=2))
    )
    assert "".join(d.text for d in deltas) == "Hi"
