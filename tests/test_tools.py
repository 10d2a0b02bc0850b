"""Tool calling: the reader, the grammar on a real vocabulary, and the official clients.

The calls come from SmolLM2 (the real model) through the real server; with
``required`` or a named tool the grammar makes a call certain, and its
arguments must validate against the schema the client sent. With ``auto`` the
model may answer either way, so those tests check what must hold for both.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pytest

from engine.guidance import GuideFactory
from engine.requests import ChatMessage, ToolCall, ToolFunction
from engine.tools import generic_messages, tool_grammar
from gateway.server import RunningServer
from gateway.toolcalls import CallArguments, CallStarted, TextPiece, ToolCallReader

from .conftest import SmolLM2Onnx
from .gateway_helpers import gateway, server_config

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string"}},
    "required": ["zone"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
OPENAI_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": name, "description": f"{name} of a place", "parameters": schema},
    }
    for name, schema in SCHEMAS.items()
]
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


# -- the reader (pure) --------------------------------------------------------------


def _ids() -> Any:
    n = iter(range(100))
    return lambda: f"call_{next(n)}"


ANSWER = (
    'Let me check. <tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}'
    '\n</tool_call>\n<tool_call>\n{"name":"get_time","arguments":{"zone":"CET"}}\n</tool_call>'
)


def _read(pieces: list[str]) -> tuple[ToolCallReader, list[Any]]:
    reader = ToolCallReader(_ids())
    events: list[Any] = []
    for p in pieces:
        events += reader.feed(p)
    events += reader.finish()
    return reader, events


def test_reader_splits_text_and_calls_the_same_way_however_the_text_is_cut() -> None:
    whole, events = _read([ANSWER])
    assert whole.text == "Let me check. "
    assert [(c.id, c.name, json.loads(c.arguments)) for c in whole.calls] == [
        ("call_0", "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("call_1", "get_time", {"zone": "CET"}),
    ]
    for size in (1, 2, 3, 7):
        reader, events = _read([ANSWER[i : i + size] for i in range(0, len(ANSWER), size)])
        assert reader.text == whole.text and reader.calls == whole.calls
        # A call starts (id and name) before any of its arguments, and its arguments
        # reassemble to exactly the final arguments: what the official clients rely on.
        for index, call in enumerate(reader.calls):
            mine = [e for e in events if not isinstance(e, TextPiece) and e.index == index]
            assert isinstance(mine[0], CallStarted) and mine[0].name == call.name
            assert all(isinstance(e, CallArguments) for e in mine[1:])
            assert "".join(e.text for e in mine[1:]) == call.arguments
        assert "".join(e.text for e in events if isinstance(e, TextPiece)) == whole.text


def test_reader_holds_back_only_what_could_start_a_call() -> None:
    reader = ToolCallReader(_ids())
    assert reader.feed("a <b> <tool") == [TextPiece("a <b> ")]
    assert reader.feed("box") == [TextPiece("<toolbox")]
    assert reader.finish() == []
    plain, _ = _read(["no calls here <tool_"])
    assert plain.text == "no calls here <tool_" and plain.calls == []


def test_reader_keeps_a_call_cut_short() -> None:
    reader, _ = _read(['<tool_call>\n{"name":"get_time","arguments":{"zo'])
    assert [(c.name, c.arguments) for c in reader.calls] == [("get_time", '{"zo')]


# -- the prompt and the grammar --------------------------------------------------------


def test_a_template_without_tools_gets_the_generic_format() -> None:
    tools = [ToolFunction("get_time", "Time of a zone", json.dumps(TIME))]
    history = [
        ChatMessage("user", "time?"),
        ChatMessage("assistant", "", tool_calls=[ToolCall("c1", "get_time", '{"zone":"CET"}')]),
        ChatMessage("tool", "12:00", tool_call_id="c1"),
        ChatMessage("tool", "13:00", tool_call_id="c2"),
    ]
    out = generic_messages(history, tools)
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert '"name":"get_time"' in out[0].content and "<tool_call>" in out[0].content
    assert (
        out[2].content
        == '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    assert out[3].content.count("<tool_response>") == 2


@pytest.fixture(scope="module")
def guides(smollm2: Path) -> GuideFactory:
    import llama_cpp

    from engine.backends.llamacpp import init_llama_cpp

    init_llama_cpp()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(smollm2).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    return GuideFactory.from_llama_vocab(vocab, int(llama_cpp.llama_vocab_n_tokens(vocab)))


def _accepts(guides: GuideFactory, grammar: str, text: str) -> bool:
    guide = guides.guide("lark", grammar)
    ids = guides.tokenizer.tokenize_str(text)
    return all(guide.accept(t) for t in ids) and guide._matcher.is_accepting()


def test_the_lazy_grammar_lets_text_through_and_holds_calls_to_their_schemas(
    guides: GuideFactory,
) -> None:
    tools = [ToolFunction(n, "", json.dumps(s)) for n, s in SCHEMAS.items()]
    auto = tool_grammar(tools, "auto")
    assert auto is not None
    assert _accepts(guides, auto, "Paris is sunny today.")
    good = '<tool_call>\n{"name":"get_time","arguments":{"zone":"CET"}}\n</tool_call>'
    assert _accepts(guides, auto, "Sure. " + good)
    assert not _accepts(guides, auto, 'Sure. <tool_call>\n{"name":"get_time","arguments":{}}')
    assert not _accepts(guides, auto, '<tool_call>\n{"name":"nope","arguments":{}}')
    required = tool_grammar(tools, "required")
    assert required is not None
    assert not _accepts(guides, required, "Paris is sunny today.")
    assert _accepts(guides, required, good + "\n" + good)
    single = tool_grammar(tools, "required", parallel=False)
    assert single is not None
    assert not _accepts(guides, single, good + "\n" + good)
    named = tool_grammar(tools, "auto", name="get_weather")
    assert named is not None and not _accepts(guides, named, good)
    assert tool_grammar(tools, "none") is None


# -- through the server ---------------------------------------------------------------


@pytest.fixture
async def running(tmp_path: Path, smollm2: Path) -> AsyncIterator[RunningServer]:
    async with gateway(server_config(tmp_path, {"smol": smollm2})) as srv:
        yield srv


@pytest.fixture
async def client(running: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    c = openai.AsyncOpenAI(
        base_url=running.http_url + "/v1", api_key=token, max_retries=0, timeout=120
    )
    try:
        yield c
    finally:
        await c.close()


def _valid(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


async def test_required_and_named_tool_choice_give_calls_that_validate(
    client: openai.AsyncOpenAI,
) -> None:
    r = await client.chat.completions.create(
        model="smol",
        messages=QUESTION,
        tools=OPENAI_TOOLS,
        tool_choice="required",
        max_tokens=120,
        **GREEDY,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and all(c.id.startswith("call_") for c in calls)
    for c in calls:
        _valid(c.function.name, c.function.arguments)
    named = await client.chat.completions.create(
        model="smol",
        messages=QUESTION,
        tools=OPENAI_TOOLS,
        max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        **GREEDY,
    )
    calls = named.choices[0].message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    _valid("get_time", calls[0].function.arguments)


async def test_streamed_calls_reassemble_to_the_unstreamed_answer(
    client: openai.AsyncOpenAI,
) -> None:
    args: dict[str, Any] = {
        "model": "smol",
        "messages": QUESTION,
        "tools": OPENAI_TOOLS,
        "tool_choice": "required",
        "max_tokens": 120,
        "seed": 1,
        **GREEDY,
    }
    whole = await client.chat.completions.create(**args)
    expected = [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls or []
    ]
    stream = await client.chat.completions.create(stream=True, **args)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    assert not call["id"], "the id comes once, first"
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    assert call["name"], "the name comes before the arguments"
                    call["arguments"] += tc.function.arguments
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == expected
    assert all(c["id"].startswith("call_") for c in calls.values())


async def test_parallel_calls_come_in_one_answer_and_one_stream(
    client: openai.AsyncOpenAI,
) -> None:
    """Two questions, two tools: the model calls both in one turn (and one tool once
    when parallel calls are off); streamed, the calls arrive as indexes 0, 1, ..."""
    args: dict[str, Any] = {
        "model": "smol",
        "messages": [
            {
                "role": "user",
                "content": "What is the weather in Paris and what time is it in Tokyo?",
            }
        ],
        "tools": OPENAI_TOOLS,
        "tool_choice": "required",
        "max_tokens": 160,
        **GREEDY,
    }
    whole = await client.chat.completions.create(parallel_tool_calls=True, **args)
    calls = whole.choices[0].message.tool_calls or []
    assert len(calls) >= 2 and {c.function.name for c in calls} == {"get_weather", "get_time"}
    assert len({c.id for c in calls}) == len(calls)
    for c in calls:
        _valid(c.function.name, c.function.arguments)
    stream = await client.chat.completions.create(parallel_tool_calls=True, stream=True, **args)
    streamed: dict[int, list[str]] = {}
    async for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            call = streamed.setdefault(tc.index, ["", ""])
            if tc.function and tc.function.name:
                call[0] += tc.function.name
            if tc.function and tc.function.arguments:
                call[1] += tc.function.arguments
    # (The same calls as the whole answer, or nearly: a prompt read from the cache
    # may round differently and tip a late greedy choice.)
    assert len(streamed) >= 2 and sorted(streamed) == list(range(len(streamed)))
    for name, arguments in streamed.values():
        _valid(name, arguments)
    one = await client.chat.completions.create(parallel_tool_calls=False, **args)
    assert len(one.choices[0].message.tool_calls or []) == 1


async def test_a_tool_result_round_trip_and_auto_and_none(client: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.create(
        model="smol",
        messages=QUESTION,
        tools=OPENAI_TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        **GREEDY,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    history: list[Any] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    for choice in ("auto", None):
        kwargs: dict[str, Any] = {} if choice is None else {"tool_choice": choice}
        r = await client.chat.completions.create(
            model="smol", messages=history, tools=OPENAI_TOOLS, max_tokens=60, **kwargs, **GREEDY
        )
        answer = r.choices[0]
        # Either way it must be coherent: calls that validate and say so, or text.
        if answer.message.tool_calls:
            assert answer.finish_reason == "tool_calls"
            for c in answer.message.tool_calls:
                _valid(c.function.name, c.function.arguments)
        else:
            assert answer.finish_reason in ("stop", "length") and answer.message.content
    none = await client.chat.completions.create(
        model="smol",
        messages=QUESTION,
        tools=OPENAI_TOOLS,
        tool_choice="none",
        max_tokens=30,
        **GREEDY,
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


async def test_bad_tool_requests_are_refused_naming_the_parameter(
    client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model="smol",
            messages=QUESTION,
            tools=OPENAI_TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert err.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="smol", messages=QUESTION, tool_choice="required"
        )
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="smol", messages=QUESTION, tools=bad_schema, tool_choice="required"
        )


async def test_the_onnx_backend_gives_calls_that_validate_through_both_clients(
    tmp_path: Path, smollm2_onnx: SmolLM2Onnx
) -> None:
    """The same tool requests on the ONNX backend (SmolLM2's fast graph, llguidance
    masks over numpy logits): the official clients get calls that validate."""
    folder = smollm2_onnx("fast")
    async with gateway(server_config(tmp_path, {"smol": folder})) as srv:
        token = srv.gateway.auth.issue_token(sub="alice", ttl=600)
        async with openai.AsyncOpenAI(
            base_url=srv.http_url + "/v1", api_key=token, max_retries=0, timeout=120
        ) as client:
            for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
                r = await client.chat.completions.create(
                    model="smol",
                    messages=QUESTION,
                    tools=OPENAI_TOOLS,
                    tool_choice=choice,  # type: ignore[arg-type]
                    parallel_tool_calls=False,
                    max_tokens=120,
                    **GREEDY,
                )
                calls = r.choices[0].message.tool_calls or []
                assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
                for c in calls:
                    _valid(c.function.name, c.function.arguments)
        o = ollama.AsyncClient(host=srv.http_url, headers={"Authorization": f"Bearer {token}"})
        try:
            await _ollama_round_trip(o)
        finally:
            await o.close()


async def test_ollama_tools_give_calls_with_object_arguments(running: RunningServer) -> None:
    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    c = ollama.AsyncClient(host=running.http_url, headers={"Authorization": f"Bearer {token}"})
    try:
        await _ollama_round_trip(c)
    finally:
        await c.close()


async def _ollama_round_trip(c: ollama.AsyncClient) -> None:
    tools: list[Any] = [{"type": "function", "function": f["function"]} for f in OPENAI_TOOLS]
    r = await c.chat(
        model="smol",
        messages=QUESTION,
        tools=tools,
        options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 120},
    )
    # Ollama has no tool_choice: the model chooses (a lazy grammar holds any call it makes).
    for call in r.message.tool_calls or []:
        jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])
    if not r.message.tool_calls:
        assert r.message.content
    history: list[Any] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "function": {
                        "name": "get_weather",
                        "arguments": {"city": "Paris", "unit": "celsius"},
                    }
                }
            ],
        },
        {"role": "tool", "content": '{"temperature": 21}', "tool_name": "get_weather"},
    ]
    r = await c.chat(
        model="smol",
        messages=history,
        tools=tools,
        options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 40},
    )
    assert r.message.content or r.message.tool_calls
    chunks = [
        part
        async for part in await c.chat(
            model="smol",
            messages=QUESTION,
            tools=tools,
            stream=True,
            options={"temperature": 0, "repeat_penalty": 1.0, "num_predict": 120},
        )
    ]
    assert chunks[-1].done
    for part in chunks:
        for call in part.message.tool_calls or []:
            jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])


async def test_websocket_tool_calls_and_results_within_a_conversation(
    running: RunningServer,
) -> None:
    from ferrous_client import FerrousClient

    token = running.gateway.auth.issue_token(sub="alice", ttl=600)
    tools = [
        {"name": n, "description": f"{n} of a place", "parameters": s} for n, s in SCHEMAS.items()
    ]
    options = {"temperature": 0, "repeat_penalty": 1.0, "max_tokens": 120}
    async with FerrousClient(running.ws_url, token=token) as client:
        gen = client.chat(
            "smol",
            "What is the weather in Paris?",
            options=options,
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
        )
        text = await gen.collect()
        assert gen.finish_reason == "tool_calls" and text == ""
        assert [c.index for c in gen.tool_calls] == [0]
        call = gen.tool_calls[0]
        _valid(call.name, call.arguments)
        # The result goes back into the same conversation the server keeps.
        answer = client.chat(
            "smol",
            [{"role": "tool", "tool_call_id": call.call_id, "content": '{"temperature": 21}'}],
            conversation=gen.conversation,
            options=options,
            tools=tools,
            tool_choice="none",
        )
        assert await answer.collect()
        assert answer.finish_reason in ("stop", "length") and answer.tool_calls == []
        owners = running.gateway.conversations._by_owner
        conv = owners[(None, "alice")][gen.conversation or ""]
        roles = [(m.role, bool(m.tool_calls)) for m in conv.messages]
        assert roles[-4:] == [
            ("user", False),
            ("assistant", True),
            ("tool", False),
            ("assistant", False),
        ]
        refused = client.chat("smol", "hi", tool_choice="required")
        with pytest.raises(Exception, match="tool_choice needs tools"):
            await refused.collect()
