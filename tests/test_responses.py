"""The Responses API through the official openai client against a real server.

The eos model says "Done." and ends; the script model repeats SCRIPT until its
token budget runs out; so texts are exact; tool calls come from SmolLM2 with a required
tool choice (a call is certain, its arguments validate against the schema).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from gateway.server import RunningServer

from .conftest import SCRIPT
from .gateway_helpers import gateway, server_config

GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER}
]


@pytest.fixture
async def running(
    tmp_path: Path, script_model: Path, eos_model: Path, smollm2: Path
) -> AsyncIterator[RunningServer]:
    models = {"script": script_model, "eos": eos_model, "smol": smollm2}
    config = server_config(tmp_path, models)
    async with gateway(config) as srv:
        yield srv


def _client(srv: RunningServer, user: str = "alice") -> openai.AsyncOpenAI:
    token = srv.gateway.auth.issue_token(sub=user, ttl=600)
    return openai.AsyncOpenAI(
        base_url=srv.http_url + "/v1", api_key=token, max_retries=0, timeout=120
    )


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    c = _client(running)
    try:
        yield c
    finally:
        await c.close()


async def test_plain_then_previous_response_id_then_get_and_delete(
    running: RunningServer, client: openai.AsyncOpenAI
) -> None:
    first = await client.responses.create(
        model="eos", input="Hello", instructions="Be brief.", **GREEDY
    )
    assert first.status == "completed" and first.output_text == "Done."
    assert first.usage is not None and first.usage.output_tokens > 0
    second = await client.responses.create(
        model="eos",
        input="And again?",
        previous_response_id=first.id,
        max_output_tokens=13,
        **GREEDY,
    )
    # The second turn read the first one (its prompt holds the whole conversation).
    assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens
    assert second.previous_response_id == first.id
    again = await client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == "Done."
    # Another user cannot see or continue it.
    other = _client(running, "mallory")
    try:
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.create(
                model="script", input="x", previous_response_id=first.id, max_output_tokens=2
            )
    finally:
        await other.close()
    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    unstored = await client.responses.create(
        model="script", input="x", store=False, max_output_tokens=2, **GREEDY
    )
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    cut = await client.responses.create(model="script", input="x", max_output_tokens=13, **GREEDY)
    assert cut.status == "incomplete" and cut.output_text == SCRIPT
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"


async def test_streamed_events_come_in_order_and_the_stream_helper_rebuilds_the_answer(
    client: openai.AsyncOpenAI,
) -> None:
    kinds: list[str] = []
    text = ""
    numbers: list[int] = []
    async for event in await client.responses.create(
        model="eos", input="Hello", stream=True, **GREEDY
    ):
        kinds.append(event.type)
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert text == "Done." and numbers == list(range(len(numbers)))
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    async with client.responses.stream(model="eos", input="Hello", **GREEDY) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_text == "Done." and final.status == "completed"


async def test_function_tools_streamed_and_a_result_round_trip(
    client: openai.AsyncOpenAI,
) -> None:
    args: dict[str, Any] = {
        "model": "smol",
        "input": "What is the weather in Paris?",
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_output_tokens": 120,
        **GREEDY,
    }
    whole = await client.responses.create(**args)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    async with client.responses.stream(**args) as stream:
        deltas = ""
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas += event.delta
        final = await stream.get_final_response()
    streamed = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in streamed] == [(calls[0].name, calls[0].arguments)]
    assert deltas == calls[0].arguments
    answer = await client.responses.create(
        model="smol",
        previous_response_id=whole.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C"}],
        tools=TOOLS,
        tool_choice="none",
        max_output_tokens=40,
        **GREEDY,
    )
    assert answer.output_text and not [i for i in answer.output if i.type == "function_call"]


async def test_bad_requests_name_the_parameter(running: RunningServer) -> None:
    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
        for body, param in (
            ({"model": "script", "input": "x", "tool_choice": "required"}, "tool_choice"),
            ({"model": "script", "input": [{"type": "image", "role": "user"}]}, "input[0].type"),
            ({"model": "script", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ):
            r = await http.post("/v1/responses", json=body, headers=headers)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param
        r = await http.post(
            "/v1/responses",
            json={"model": "script", "input": "x", "previous_response_id": "resp_nope"},
            headers=headers,
        )
        assert r.status_code == 404
