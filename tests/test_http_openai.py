"""The OpenAI-compatible surface, driven by the official ``openai`` client against a real server.

The server runs on the test's event loop, so only async clients are used
(``openai.AsyncOpenAI``, ``httpx.AsyncClient``). Outputs of the script model are
exact under greedy sampling: it repeats SCRIPT (13 tokens) after any prompt.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from gateway.config import AuthConfig, LimitsConfig
from gateway.server import RunningServer

from .conftest import SCRIPT
from .gateway_helpers import gateway, server_config

SCRIPT_TOKENS = 13
# Greedy, without the engine's default repeat penalty (an extension field).
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
MAX_BODY = 64 * 1024


def _token(srv: RunningServer) -> str:
    return srv.gateway.auth.issue_token(sub="alice", ttl=600)


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def running(
    tmp_path: Path, script_model: Path, eos_model: Path, random_model: Path, slow_model: Path
) -> AsyncIterator[RunningServer]:
    models = {"script": script_model, "eos": eos_model, "random": random_model, "slow": slow_model}
    config = server_config(tmp_path, models, limits=LimitsConfig(max_body_bytes=MAX_BODY))
    async with gateway(config) as srv:
        yield srv


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(
        base_url=running.http_url + "/v1", api_key=_token(running), max_retries=0, timeout=60
    )
    try:
        yield c
    finally:
        await c.close()


async def _post(
    srv: RunningServer,
    path: str,
    *,
    json_body: Any = None,
    content: bytes | None = None,
    token: str | None = "",
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or _token(srv)}"} if token is not None else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as http:
        return await http.post(path, json=json_body, content=content, headers=headers)


def _assert_openai_error(r: httpx.Response, status: int, code: str, param: str | None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


# -- chat completions -------------------------------------------------------------------


async def test_chat_completion_answers_in_openai_shape(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="script", messages=_user("hello"), max_tokens=2 * SCRIPT_TOKENS, **GREEDY
    )
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.model == "script"
    assert r.system_fingerprint and r.system_fingerprint.startswith("ferrousforge-")
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == SCRIPT * 2
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 2 * SCRIPT_TOKENS
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_chat_ends_with_stop_at_the_end_of_generation(client: openai.AsyncOpenAI) -> None:
    # max_completion_tokens is the newer name of max_tokens.
    r = await client.chat.completions.create(
        model="eos",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            },
            {"role": "assistant", "content": "ok"},
            {"role": "developer", "content": "Still brief."},
            {"role": "user", "content": "again"},
        ],
        max_completion_tokens=50,
        **GREEDY,
    )
    assert r.choices[0].message.content == "Done."
    assert r.choices[0].finish_reason == "stop"


async def test_streamed_chat_equals_the_whole_answer(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(
        model="script", messages=_user("hi"), max_tokens=30, **GREEDY
    )
    stream = await client.chat.completions.create(
        model="script",
        messages=_user("hi"),
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    # The usage chunk comes last, with no choices.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_without_include_usage_has_no_usage_chunk(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.chat.completions.create(
        model="eos", messages=_user("hi"), stream=True, **GREEDY
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Done."
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_stop_sequences(client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="script", messages=_user("hi"), stop="你", max_tokens=100, **GREEDY
    )
    assert r.choices[0].message.content == "Hi ö"
    assert r.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(
        model="script",
        messages=_user("hi"),
        stop=["nothing", "🙂!"],
        max_tokens=100,
        stream=True,
        **GREEDY,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hi ö你"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_seed_makes_sampling_repeatable(client: openai.AsyncOpenAI) -> None:
    async def sample(seed: int) -> str:
        r = await client.chat.completions.create(
            model="random", messages=_user("hi"), temperature=0.8, seed=seed, max_tokens=24
        )
        return r.choices[0].message.content or ""

    first = await sample(1234)
    assert first
    assert await sample(1234) == first
    others = {await sample(s) for s in (1, 2, 3)}
    assert others != {first}


# -- completions --------------------------------------------------------------------------


async def test_completions(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(
        model="script", prompt="Once", max_tokens=SCRIPT_TOKENS, **GREEDY
    )
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "script"
    [choice] = r.choices
    assert choice.text == SCRIPT and choice.finish_reason == "length" and choice.index == 0
    assert r.usage is not None and r.usage.completion_tokens == SCRIPT_TOKENS
    # OpenAI's default of 16 tokens applies when max_tokens is left out.
    r = await client.completions.create(model="script", prompt=["Once"], **GREEDY)
    assert r.usage is not None and r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"
    # echo puts the prompt first.
    r = await client.completions.create(
        model="script", prompt="Once", max_tokens=SCRIPT_TOKENS, echo=True, **GREEDY
    )
    assert r.choices[0].text == "Once" + SCRIPT
    r = await client.completions.create(model="eos", prompt="x", max_tokens=50, **GREEDY)
    assert r.choices[0].text == "Done." and r.choices[0].finish_reason == "stop"


async def test_streamed_completions(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model="script",
        prompt="Once",
        max_tokens=SCRIPT_TOKENS,
        echo=True,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = [c async for c in stream]
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once" + SCRIPT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == SCRIPT_TOKENS


async def test_completions_refuse_what_they_cannot_do(client: openai.AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2]]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
    ]
    for args, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="script", **args)
        assert info.value.code == "bad_request"
        assert _body(info.value)["param"] == param, args


# -- models ---------------------------------------------------------------------------


async def test_models_are_listed(client: openai.AsyncOpenAI) -> None:
    ids = [x.id async for x in client.models.list()]
    assert {"script", "eos", "random", "slow"} <= set(ids)
    page = await client.models.list()
    assert all(x.object == "model" and x.owned_by for x in page.data)


async def test_a_stored_model_is_retrieved(tmp_path: Path, eos_model: Path) -> None:
    from engine.store.pull import ModelManager
    from engine.store.store import ModelStore

    (tmp_path / "okay.gguf").write_bytes(eos_model.read_bytes())
    await ModelManager(ModelStore(tmp_path / "models")).pull(str(tmp_path / "okay.gguf"))
    async with gateway(server_config(tmp_path, {})) as srv:
        c = openai.AsyncOpenAI(base_url=srv.http_url + "/v1", api_key=_token(srv), max_retries=0)
        try:
            model = await c.models.retrieve("okay")
            assert model.id == "okay" and model.object == "model"
            r = await c.chat.completions.create(model="okay", messages=_user("hi"), **GREEDY)
            assert r.choices[0].message.content == "Done."
        finally:
            await c.close()


# -- embeddings -----------------------------------------------------------------------


async def test_embeddings_float_and_base64(client: openai.AsyncOpenAI) -> None:
    floats = await client.embeddings.create(
        model="script", input=["hello world", "other text"], encoding_format="float"
    )
    assert floats.object == "list" and floats.model == "script"
    assert [d.index for d in floats.data] == [0, 1]
    assert all(d.object == "embedding" for d in floats.data)
    vectors = [d.embedding for d in floats.data]
    assert all(len(v) == 64 for v in vectors)  # the tiny model's n_embd
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    assert vectors[0] != vectors[1]
    assert floats.usage.prompt_tokens > 0
    assert floats.usage.total_tokens == floats.usage.prompt_tokens
    # The client asks for base64 unless told otherwise, and decodes it.
    default = await client.embeddings.create(model="script", input=["hello world", "other text"])
    for got, want in zip(default.data, vectors, strict=True):
        assert np.allclose(got.embedding, want, atol=1e-6)
    one = await client.embeddings.create(model="script", input="hello world", dimensions=64)
    assert np.allclose(one.data[0].embedding, vectors[0], atol=1e-6)


async def test_embeddings_base64_is_little_endian_float32(running: RunningServer) -> None:
    body = {"model": "script", "input": "hello", "encoding_format": "base64"}
    r = await _post(running, "/v1/embeddings", json_body=body)
    assert r.status_code == 200, r.text
    encoded = r.json()["data"][0]["embedding"]
    vector = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert vector.shape == (64,)
    assert math.isclose(float(np.dot(vector, vector)), 1.0, rel_tol=1e-4)


async def test_embeddings_refuse_bad_input(client: openai.AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": [1, 2, 3]}, "input"),
        ({"input": [[1, 2]]}, "input"),
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": "x", "dimensions": 8}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ]
    for args, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model="script", **args)
        assert _body(info.value)["param"] == param, args
    with pytest.raises(openai.NotFoundError) as nf:
        await client.embeddings.create(model="no-such-model", input="x")
    assert nf.value.code == "model_not_found"


# -- errors ---------------------------------------------------------------------------


def _body(exc: openai.APIStatusError) -> dict[str, Any]:
    assert isinstance(exc.body, dict), exc.body
    return exc.body


async def test_unknown_model_is_a_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="no-such-model", messages=_user("hi"))
    assert info.value.code == "model_not_found"
    assert _body(info.value)["type"] == "invalid_request_error"
    assert _body(info.value)["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-model", prompt="x", stream=True)


async def test_bad_parameters_are_400s_that_name_them(client: openai.AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"n": 17}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f f"}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"extra_body": {"keep_alive": "soon"}}, "keep_alive"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                    }
                ]
            },
            "messages[0].content[0].image_url",  # not a data URL
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ]
            },
            "messages[0].content",
        ),
    ]
    for args, param in cases:
        kwargs: dict[str, Any] = {"model": "script", "messages": _user("hi"), **args}
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(**kwargs)
        body = _body(info.value)
        assert body["param"] == param, (args, body)
        assert body["type"] == "invalid_request_error" and body["code"] == "bad_request"


async def test_loopback_clients_need_no_key_by_default(running: RunningServer) -> None:
    # The official client insists on some api_key: a placeholder works on loopback.
    c = openai.AsyncOpenAI(base_url=running.http_url + "/v1", api_key="unused", max_retries=0)
    try:
        reply = await c.chat.completions.create(model="eos", messages=_user("hi"))
        assert reply.choices[0].message.content == "Done."
    finally:
        await c.close()


async def test_credentials_are_required_on_a_shared_machine(
    tmp_path: Path, script_model: Path
) -> None:
    shared = AuthConfig(loopback_without_token=False)
    async with gateway(server_config(tmp_path, {"script": script_model}, auth=shared)) as srv:
        for key in ("not-a-key", "x.y.z"):
            c = openai.AsyncOpenAI(base_url=srv.http_url + "/v1", api_key=key, max_retries=0)
            try:
                with pytest.raises(openai.AuthenticationError) as info:
                    await c.chat.completions.create(model="script", messages=_user("hi"))
                assert _body(info.value)["type"] == "authentication_error"
                assert info.value.code == "unauthorized"
            finally:
                await c.close()
        r = await _post(
            srv, "/v1/chat/completions", json_body={"model": "script", "messages": []}, token=None
        )
        _assert_openai_error(r, 401, "unauthorized", None)
        assert r.headers["www-authenticate"] == "Bearer"
        # The Responses API too: creating, reading and deleting all need a credential.
        r = await _post(
            srv, "/v1/responses", json_body={"model": "script", "input": "hi"}, token=None
        )
        _assert_openai_error(r, 401, "unauthorized", None)
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as http:
            for method in ("GET", "DELETE"):
                r = await http.request(method, "/v1/responses/resp_x")
                _assert_openai_error(r, 401, "unauthorized", None)
        # Oversized and malformed bodies are refused before anything runs.
        token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
        huge = {"model": "script", "input": "x" * (2 * 1024 * 1024)}
        r = await _post(srv, "/v1/responses", json_body=huge, token=token)
        _assert_openai_error(r, 413, "too_large", None)


async def test_malformed_and_oversized_bodies(running: RunningServer) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        r = await _post(running, path, content=b'{"model": "script", ')
        _assert_openai_error(r, 400, "bad_request", None)
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await _post(running, path, content=b"")
        _assert_openai_error(r, 400, "bad_request", None)
    huge = {"model": "script", "messages": _user("x" * (MAX_BODY + 10))}
    r = await _post(running, "/v1/chat/completions", json_body=huge)
    _assert_openai_error(r, 413, "too_large", None)
    assert r.json()["error"]["type"] == "invalid_request_error"
    # A missing required field is named.
    r = await _post(running, "/v1/chat/completions", json_body={"messages": _user("x")})
    _assert_openai_error(r, 400, "bad_request", "model")


async def test_a_stream_refused_by_the_engine_is_a_plain_http_error(
    client: openai.AsyncOpenAI,
) -> None:
    # The prompt does not fit the 2048-token context: refused before the first byte.
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="script", prompt="word " * 600, stream=True)
    assert info.value.code == "bad_request"


async def test_an_error_after_the_stream_started_is_an_event(
    running: RunningServer, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model="slow", messages=_user("hi"), stream=True, **GREEDY
    )
    seen = 0
    with pytest.raises(openai.APIError) as info:
        async for _chunk in stream:
            seen += 1
            if seen == 3:  # unloading the model ends its generations as cancelled
                await running.gateway.models.unload("slow")
    assert seen >= 3
    assert _body(info.value)["code"] == "cancelled"
    assert _body(info.value)["type"] == "server_error"
    await stream.close()


# -- structured output (a real model) ---------------------------------------------------


@pytest.mark.smollm2
async def test_structured_output(tmp_path: Path, smollm2: Path) -> None:
    async with gateway(server_config(tmp_path, {"smol": smollm2})) as srv:
        c = openai.AsyncOpenAI(base_url=srv.http_url + "/v1", api_key=_token(srv), max_retries=0)
        try:
            schema = {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": False,
            }
            r = await c.chat.completions.create(
                model="smol",
                messages=_user("Invent a person. Answer in JSON with their name and age."),
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": schema, "strict": True},
                },
                temperature=0,
                max_tokens=200,
            )
            assert r.choices[0].finish_reason == "stop"
            person = json.loads(r.choices[0].message.content or "")
            assert set(person) == {"name", "age"}
            assert isinstance(person["name"], str) and isinstance(person["age"], int)
            r = await c.chat.completions.create(
                model="smol",
                messages=_user("Give the capital of France as JSON."),
                response_format={"type": "json_object"},
                temperature=0,
                max_tokens=300,
            )
            assert r.choices[0].finish_reason == "stop"
            assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
        finally:
            await c.close()


# -- disconnects cancel -----------------------------------------------------------------


async def _engine_settles(srv: RunningServer) -> None:
    """Wait until no generation runs, then check that no tokens are being generated and
    that the generation was cut short (the slow model would run to its 4096-token context)."""
    for _ in range(200):
        health = await srv.gateway.engine.health()
        if all(w.active == 0 for w in health.workers):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the generation kept running after the client left")
    before = sum(w.tokens_generated for w in health.workers)
    await asyncio.sleep(0.3)
    after = sum(w.tokens_generated for w in (await srv.gateway.engine.health()).workers)
    assert after == before
    assert after < 1000


async def _running_tokens(srv: RunningServer) -> int:
    """Tokens generated so far, once a generation is running."""
    for _ in range(200):
        health = await srv.gateway.engine.health()
        if any(w.active for w in health.workers):
            return sum(w.tokens_generated for w in health.workers)
        await asyncio.sleep(0.02)
    pytest.fail("no generation started")


async def test_a_client_leaving_a_stream_cancels_it(running: RunningServer) -> None:
    body = {"model": "slow", "messages": _user("hi"), "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {_token(running)}"}
    async with (
        httpx.AsyncClient(base_url=running.http_url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(json.loads(line[6:]))
            if len(lines) >= 5:
                break
    assert lines[0]["choices"][0]["delta"]["role"] == "assistant"
    await _engine_settles(running)


async def test_a_client_timing_out_cancels_a_whole_answer(running: RunningServer) -> None:
    body = {"model": "slow", "messages": _user("hi"), "temperature": 0}
    headers = {"Authorization": f"Bearer {_token(running)}"}
    async with httpx.AsyncClient(base_url=running.http_url, timeout=0.5) as http:
        # Load the model first, so the timeout falls during the generation.
        await http.post(
            "/v1/completions",
            json={"model": "slow", "prompt": "x", "max_tokens": 1},
            headers=headers,
            timeout=30,
        )
        task = asyncio.ensure_future(http.post("/v1/chat/completions", json=body, headers=headers))
        await _running_tokens(running)
        with pytest.raises(httpx.ReadTimeout):
            await task
    await _engine_settles(running)
