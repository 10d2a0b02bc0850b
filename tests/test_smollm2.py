"""The real model: SmolLM2-135M-Instruct through the worker pool."""

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
from engine.smollm2 import SMOLLM2_SHA256, sha256_file

from .conftest import collect

pytestmark = pytest.mark.smollm2


def test_the_fetched_file_is_the_verified_model(smollm2: Path) -> None:
    assert sha256_file(smollm2) == SMOLLM2_SHA256


async def test_smollm2_answers_the_capital_of_france(smollm2: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        info = await client.load("smollm2", smollm2)
        assert info.n_ctx == 4096
        question = "What is the capital of France? Answer in one sentence."
        request = GenerateRequest(
            model="smollm2",
            messages=[ChatMessage("user", question)],
            sampling=SamplingParams(temperature=0.0, max_tokens=64),
        )
        deltas, done = await collect(client, request)
        answer = "".join(d.text for d in deltas)
        assert "Paris" in answer
        assert len(deltas) > 1  # streamed, not delivered whole
        assert done.finish_reason is FinishReason.STOP  # <|im_end|> ends the turn
        assert "<|im_end|>" not in answer
        assert done.usage.prompt_tokens > 20 and done.usage.completion_tokens == len(deltas)
        assert done.timings.decode_tok_s > 0 and done.timings.ttft_ms > 0
