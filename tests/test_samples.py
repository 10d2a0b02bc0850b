"""``n`` samples on the OpenAI surface: n choices, each the sample its seed gives, one prompt read.

The random model (a tiny model with random weights) makes different text
for different seeds, so a sample can be matched to the request that would
have produced it alone: choice ``i`` of a request with ``seed`` equals a
single request with ``seed + i``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.server import RunningServer

from .gateway_helpers import gateway, server_config

PROMPT = [{"role": "user", "content": "Tell me a long story about a small town by the sea."}]
SAMPLED: dict[str, Any] = {"temperature": 1.0, "max_tokens": 12}


@pytest.fixture
async def running(tmp_path: Path, random_model: Path) -> AsyncIterator[RunningServer]:
    async with gateway(server_config(tmp_path, {"random": random_model})) as srv:
        yield srv


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    c = openai.AsyncOpenAI(
        base_url=running.http_url + "/v1", api_key=token, max_retries=0, timeout=60
    )
    try:
        yield c
    finally:
        await c.close()


def _cached(srv: RunningServer) -> float:
    return sum(
        s.value
        for metric in srv.gateway.metrics.cached_tokens.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )


async def test_n_choices_are_the_seeded_samples_and_share_the_prompt(
    running: RunningServer, client: openai.AsyncOpenAI
) -> None:
    alone = []
    for i in range(3):
        r = await client.chat.completions.create(
            model="random", messages=PROMPT, seed=5 + i, **SAMPLED
        )
        alone.append(r.choices[0].message.content)
    assert len(set(alone)) > 1, "different seeds should give different samples"
    before = _cached(running)
    r = await client.chat.completions.create(
        model="random", messages=PROMPT, seed=5, n=3, **SAMPLED
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == alone
    assert r.usage is not None and r.usage.completion_tokens == 3 * 12
    # The two later samples copied the prompt from the first instead of reading it.
    assert _cached(running) - before >= 2 * (r.usage.prompt_tokens - 2)

    stream = await client.chat.completions.create(
        model="random",
        messages=PROMPT,
        seed=5,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
        **SAMPLED,
    )
    texts = ["", "", ""]
    finished = set()
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert texts == alone and finished == {0, 1, 2}
    assert usage is not None and usage.completion_tokens == 3 * 12

    legacy = await client.completions.create(
        model="random", prompt="Once upon a time", seed=9, n=2, max_tokens=8, temperature=1.0
    )
    assert [c.index for c in legacy.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="random", messages=PROMPT, n=17)
