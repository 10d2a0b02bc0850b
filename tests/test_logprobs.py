"""Log-probabilities: the pure computation, both backends, and every surface that asks.

Greedy decoding picks the likeliest token, so with logprobs on, each token's
own entry must equal the first of its alternatives: a check that the figure
belongs to the token it is attached to, on every path.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import ollama
import openai
import pytest

from engine import EngineClient, EngineConfig, GenerateRequest, SamplingParams, TokenDelta
from engine.logprobs import token_logprobs
from engine.onnx.tinydecoder import write_tiny_decoder
from gateway.server import RunningServer

from .gateway_helpers import gateway, server_config

GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}


def test_token_logprobs_are_a_log_softmax() -> None:
    logits = np.array([2.0, 1.0, -np.inf, 0.0], dtype=np.float32)
    chosen, top = token_logprobs(logits, 1, 3)
    z = math.log(math.exp(2) + math.exp(1) + math.exp(0))
    assert chosen == pytest.approx(1 - z)
    assert [i for i, _ in top] == [0, 1, 3]  # a masked token (-inf) is never listed
    assert sum(math.exp(p) for _, p in top) == pytest.approx(1.0)
    assert token_logprobs(logits, 2, 0) == (float("-inf"), [])


def _check(tokens: list[dict[str, Any]], text: str | None) -> None:
    if text is not None:
        # A token may hold part of a character: its bytes, joined, are the text.
        joined = b"".join(bytes(t["bytes"]) for t in tokens)
        assert joined.decode("utf-8", "replace") == text
    for t in tokens:
        assert t["logprob"] <= 0
        tops = t["top_logprobs"]
        assert tops and tops[0]["token"] == t["token"]
        assert tops[0]["logprob"] == pytest.approx(t["logprob"])
        assert [x["logprob"] for x in tops] == sorted((x["logprob"] for x in tops), reverse=True)


async def test_the_onnx_backend_reports_the_same_kind_of_figures(tmp_path: Path) -> None:
    folder = write_tiny_decoder(tmp_path / "tiny")
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as engine:
        await engine.load("onnx", folder, backend="onnx")
        sampling = SamplingParams(
            temperature=0.0, repeat_penalty=1.0, max_tokens=8, ignore_eos=True, logprobs=2
        )
        lps = []
        async for ev in engine.generate(
            GenerateRequest(model="onnx", prompt="x", sampling=sampling)
        ):
            if isinstance(ev, TokenDelta):
                assert ev.logprobs is not None
                lps += ev.logprobs
        assert len(lps) == 8
        for lp in lps:
            assert lp.top[0].token == lp.token and lp.top[0].logprob == pytest.approx(lp.logprob)


@pytest.fixture
async def running(tmp_path: Path, script_model: Path) -> AsyncIterator[RunningServer]:
    async with gateway(server_config(tmp_path, {"script": script_model})) as srv:
        yield srv


async def test_openai_chat_completions_and_legacy_completions(running: RunningServer) -> None:
    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    client = openai.AsyncOpenAI(
        base_url=running.http_url + "/v1", api_key=token, max_retries=0, timeout=60
    )
    try:
        messages: Any = [{"role": "user", "content": "hi"}]
        r = await client.chat.completions.create(
            model="script",
            messages=messages,
            max_tokens=10,
            logprobs=True,
            top_logprobs=3,
            **GREEDY,
        )
        choice = r.choices[0]
        assert choice.logprobs is not None and choice.logprobs.content is not None
        entries = [e.model_dump() for e in choice.logprobs.content]
        assert len(entries) == 10
        _check(entries, choice.message.content or "")
        plain = await client.chat.completions.create(
            model="script", messages=messages, max_tokens=4, **GREEDY
        )
        assert plain.choices[0].logprobs is None
        streamed: list[dict[str, Any]] = []
        text = ""
        async for chunk in await client.chat.completions.create(
            model="script",
            messages=messages,
            max_tokens=10,
            logprobs=True,
            top_logprobs=3,
            stream=True,
            **GREEDY,
        ):
            for c in chunk.choices:
                text += c.delta.content or ""
                if c.logprobs is not None and c.logprobs.content:
                    streamed += [e.model_dump() for e in c.logprobs.content]
        assert text == choice.message.content and streamed == entries
        legacy = await client.completions.create(
            model="script", prompt="hi", max_tokens=6, logprobs=2, temperature=0
        )
        lp = legacy.choices[0].logprobs
        assert lp is not None and lp.tokens is not None and lp.text_offset is not None
        assert lp.text_offset == sorted(lp.text_offset) and len(lp.text_offset) == 6
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="script", messages=messages, top_logprobs=2, **GREEDY
            )
    finally:
        await client.close()


async def test_ollama_and_websocket(running: RunningServer) -> None:
    from ferrous_client import FerrousClient

    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    client = ollama.AsyncClient(host=running.http_url, headers={"Authorization": f"Bearer {token}"})
    try:
        r = await client.generate(
            model="script",
            prompt="hi",
            logprobs=True,
            top_logprobs=2,
            options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 5},
        )
        entries = [e if isinstance(e, dict) else e.model_dump() for e in r.logprobs or []]
        assert len(entries) == 5  # (the Ollama client keeps no bytes: texts only)
        assert r.response.startswith("".join(e["token"] for e in entries[:2]))
        _check(entries, None)
    finally:
        await client.close()
    async with FerrousClient(running.ws_url, token=token) as ws:
        gen = ws.chat(
            "script",
            "hi",
            options={"temperature": 0, "repeat_penalty": 1.0, "max_tokens": 7, "logprobs": 1},
        )
        deltas = [d async for d in gen]
        tokens = [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": lp.bytes,
                "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in lp.top_logprobs],
            }
            for d in deltas
            for lp in d.logprobs or []
        ]
        assert len(tokens) == 7
        _check(tokens, "".join(d.text for d in deltas))
