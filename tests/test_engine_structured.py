"""Structured output: generations constrained by a GBNF grammar, a JSON Schema, or "any JSON".

Through a real one-worker pool, so the grammar is compiled in the worker and
its errors travel back as typed request errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from engine import (
    ChatMessage,
    EngineClient,
    EngineConfig,
    FinishReason,
    GenerateRequest,
    GenerationDone,
    SamplingParams,
    TokenDelta,
)
from engine.backends import available_backends
from protocol.errors import BadRequest

from .conftest import SCRIPT, SmolLM2Onnx, collect

PERSON_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
)
ASK_PERSON = [ChatMessage("user", "Give me a person with a name and an age, as JSON.")]


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "repeat_penalty": 1.0, **kw})  # type: ignore[arg-type]


def check_person(text: str) -> None:
    """The output is exactly an object with a string name and an integer age."""
    value = json.loads(text)
    assert isinstance(value, dict), text
    assert set(value) == {"name", "age"}, text
    assert isinstance(value["name"], str), text
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool), text


async def answer(client: EngineClient, request: GenerateRequest) -> tuple[str, GenerationDone]:
    deltas, done = await collect(client, request)
    return "".join(d.text for d in deltas), done


@pytest.fixture
async def smol(smollm2: Path) -> AsyncIterator[EngineClient]:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("smollm2", smollm2)
        yield client


@pytest.mark.smollm2
@pytest.mark.parametrize(
    "sampling",
    [
        greedy(max_tokens=128),
        SamplingParams(temperature=0.8, seed=42, max_tokens=128),
    ],
    ids=["greedy", "sampled"],
)
async def test_a_json_schema_shapes_the_output(
    smol: EngineClient, sampling: SamplingParams
) -> None:
    sampling = msgspec.structs.replace(sampling, json_schema=PERSON_SCHEMA)
    text, done = await answer(
        smol, GenerateRequest(model="smollm2", messages=ASK_PERSON, sampling=sampling)
    )
    check_person(text)
    # The end-of-generation token is allowed once the grammar is complete, and ends it.
    assert done.finish_reason is FinishReason.STOP


@pytest.mark.smollm2
async def test_json_mode_gives_a_json_object(smol: EngineClient) -> None:
    text, done = await answer(
        smol,
        GenerateRequest(
            model="smollm2",
            messages=ASK_PERSON,
            sampling=greedy(json=True, max_tokens=256),
        ),
    )
    assert done.finish_reason is FinishReason.STOP, text
    assert isinstance(json.loads(text), dict)  # an object root, as Ollama's format "json"


@pytest.mark.smollm2
@pytest.mark.parametrize(
    "sampling", [greedy(), SamplingParams(temperature=1.0, seed=7)], ids=["greedy", "sampled"]
)
async def test_a_raw_grammar_allows_only_its_language(
    smol: EngineClient, sampling: SamplingParams
) -> None:
    sampling = msgspec.structs.replace(sampling, grammar='root ::= ("yes" | "no")', max_tokens=16)
    text, done = await answer(
        smol,
        GenerateRequest(
            model="smollm2",
            messages=[ChatMessage("user", "Is the sky green? Explain your answer.")],
            sampling=sampling,
        ),
    )
    assert text in ("yes", "no")
    assert done.finish_reason is FinishReason.STOP


@pytest.mark.smollm2
async def test_a_repeat_penalty_does_not_feed_the_prompt_to_the_grammar(
    smol: EngineClient,
) -> None:
    """The penalty sampler sees the prompt's tokens; the grammar must not (it would reject them)."""
    text, _ = await answer(
        smol,
        GenerateRequest(
            model="smollm2",
            messages=ASK_PERSON,
            sampling=SamplingParams(
                temperature=0.0, repeat_penalty=1.3, json_schema=PERSON_SCHEMA, max_tokens=128
            ),
        ),
    )
    check_person(text)


@pytest.mark.smollm2
@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (greedy(json_schema='{"type": 12}'), "invalid or unsupported JSON schema"),
        (greedy(json_schema="not json"), "json_schema is not valid JSON"),
        (greedy(json_schema="[1, 2]"), "json_schema must be a JSON object"),
        (greedy(grammar="root ::= answer"), "Undefined rule identifier 'answer'"),
        (greedy(grammar='root ::= root "a"'), "left recursion"),
        (greedy(grammar="   "), "the grammar is empty"),
        (greedy(grammar="root ::= " + "(" * 5000 + '"a"' + ")" * 5000), "nests groups"),
        (greedy(json_schema='{"type": "string", "maxLength": 100000}'), "lower maxLength"),
        (greedy(json=True, grammar='root ::= "a"'), "at most one output format"),
    ],
    ids=[
        "schema-type",
        "schema-not-json",
        "schema-not-object",
        "undefined-rule",
        "left-recursion",
        "empty-grammar",
        "deep-grammar",
        "huge-schema",
        "two-constraints",
    ],
)
async def test_invalid_constraints_are_bad_requests_and_the_pool_keeps_serving(
    smol: EngineClient, sampling: SamplingParams, message: str
) -> None:
    # The deep grammar and the huge schema would overflow llama.cpp's parser stack
    # (a segfault) if they reached it: they must be refused before.
    with pytest.raises(BadRequest, match=message):
        await collect(smol, GenerateRequest(model="smollm2", prompt="Hi", sampling=sampling))
    health = await smol.health()
    assert health.ok and health.restarts == 0
    text, _ = await answer(
        smol, GenerateRequest(model="smollm2", prompt="Hi", sampling=greedy(max_tokens=4))
    )
    assert text


@pytest.mark.smollm2
async def test_constrained_and_free_generations_share_a_batch(smol: EngineClient) -> None:
    free = GenerateRequest(
        model="smollm2",
        messages=[ChatMessage("user", "Count from 1 to 20, separated by commas.")],
        sampling=greedy(max_tokens=80),
    )
    alone, _ = await answer(smol, free)

    async def timed(request: GenerateRequest) -> list[tuple[float, str]]:
        out = []
        async for event in smol.generate(request):
            if isinstance(event, TokenDelta):
                out.append((time.perf_counter(), event.text))
        return out

    constrained = GenerateRequest(
        model="smollm2",
        messages=ASK_PERSON,
        sampling=greedy(json_schema=PERSON_SCHEMA, max_tokens=128),
    )
    free_out, constrained_out = await asyncio.gather(timed(free), timed(constrained))
    # One worker, both running at once: the constrained one ran while the other streamed,
    # so they were stepped in the same batches.
    assert constrained_out[0][0] < free_out[-1][0]
    check_person("".join(t for _, t in constrained_out))
    # The grammar of one sequence does not leak into the other.
    assert "".join(t for _, t in free_out) == alone


@pytest.mark.ctransformers
@pytest.mark.skipif(
    "ctransformers" not in available_backends(), reason="ctransformers not installed"
)
async def test_ctransformers_refuses_structured_output(script_model: Path) -> None:
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("ct", script_model, backend="ctransformers")
        with pytest.raises(
            BadRequest, match="structured output needs the llama_cpp or onnx backend"
        ):
            await collect(
                client, GenerateRequest(model="ct", prompt="x", sampling=greedy(json=True))
            )
        deltas, _ = await collect(
            client, GenerateRequest(model="ct", prompt="x", sampling=greedy(max_tokens=13))
        )
        assert "".join(d.text for d in deltas) == SCRIPT


async def test_the_script_model_follows_a_grammar_against_its_will(script_model: Path) -> None:
    """No download needed: the tiny model would say SCRIPT; the grammar makes it say "ok"."""
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("script", script_model)
        deltas, done = await collect(
            client,
            GenerateRequest(
                model="script", prompt="x", sampling=greedy(grammar='root ::= "o" "k"')
            ),
        )
        assert "".join(d.text for d in deltas) == "ok"
        assert done.finish_reason is FinishReason.STOP
        with pytest.raises(BadRequest, match="Undefined rule"):
            await collect(
                client,
                GenerateRequest(model="script", prompt="x", sampling=greedy(grammar="root ::= x")),
            )


async def test_a_grammar_the_vocabulary_cannot_spell_fails_only_its_generation(
    slow_model: Path,
) -> None:
    """No token can spell NUL: the grammar masks everything. llama.cpp would pick a token
    anyway and abort the worker when its grammar rejects it; here only that request fails."""
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("script", slow_model)  # steps take milliseconds
        rounds = 30
        free = asyncio.create_task(
            answer(
                client,
                GenerateRequest(
                    model="script", prompt="x", sampling=greedy(max_tokens=13 * rounds)
                ),
            )
        )
        await asyncio.sleep(0.05)  # the free generation is running: the next one joins its batch
        for sampling in (
            greedy(grammar='root ::= "\\x00"'),
            SamplingParams(grammar='root ::= "\\x00"'),
        ):
            with pytest.raises(BadRequest, match="allows no token"):
                await collect(
                    client, GenerateRequest(model="script", prompt="x", sampling=sampling)
                )
        assert not free.done()  # they failed inside its batch; it goes on
        text, done = await free
        assert text == SCRIPT * rounds and done.finish_reason is FinishReason.LENGTH
        assert (await client.health()).restarts == 0


async def test_ignore_eos_after_a_complete_grammar_runs_to_max_tokens(script_model: Path) -> None:
    """A complete grammar allows only end tokens; ignoring them must not upset llama.cpp."""
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("script", script_model)
        sampling = greedy(grammar='root ::= "o" "k"', ignore_eos=True, max_tokens=8)
        text, done = await answer(
            client, GenerateRequest(model="script", prompt="x", sampling=sampling)
        )
        assert text == "ok" and done.finish_reason is FinishReason.LENGTH
        assert (await client.health()).restarts == 0


@pytest.mark.smollm2
async def test_greedy_grammar_shortcut_picks_what_full_masking_picks(smol: EngineClient) -> None:
    """Greedy decoding checks the argmax against the grammar first; masking the whole
    vocabulary (the sampler chain, here with top_k=1) must give the very same tokens."""
    questions = [
        "Give me a person with a name and an age, as JSON.",
        "Describe a city in JSON with its name and population.",
    ]
    for question in questions:
        prompt = [ChatMessage("user", question)]
        fast = greedy(json_schema=PERSON_SCHEMA, max_tokens=64)
        full = SamplingParams(
            temperature=0.7,
            top_k=1,
            seed=3,
            repeat_penalty=1.0,
            json_schema=PERSON_SCHEMA,
            max_tokens=64,
        )
        a, _ = await answer(smol, GenerateRequest(model="smollm2", messages=prompt, sampling=fast))
        b, _ = await answer(smol, GenerateRequest(model="smollm2", messages=prompt, sampling=full))
        assert a == b
        check_person(a)


@pytest.mark.smollm2
async def test_the_onnx_backend_honours_schemas_json_grammars_and_tools(
    smollm2_onnx: SmolLM2Onnx,
) -> None:
    """The ONNX fast graph: the same constraints as llama.cpp, several sequences at once."""
    from engine import ToolFunction

    folder = smollm2_onnx("fast")
    async with EngineClient(EngineConfig(workers=1, threads_per_worker=1)) as client:
        await client.load("onnx", folder, backend="onnx")
        weather = json.dumps(
            {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            }
        )
        requests = [
            GenerateRequest(
                model="onnx",
                messages=ASK_PERSON,
                sampling=greedy(json_schema=PERSON_SCHEMA, max_tokens=96),
            ),
            GenerateRequest(
                model="onnx", messages=ASK_PERSON, sampling=greedy(json=True, max_tokens=96)
            ),
            GenerateRequest(
                model="onnx", prompt="Yes or no?", sampling=greedy(grammar='root ::= "yes" | "no"')
            ),
            GenerateRequest(
                model="onnx",
                messages=[ChatMessage("user", "What is the weather in Paris?")],
                sampling=greedy(max_tokens=96),
                tools=[ToolFunction("get_weather", "", weather)],
                tool_choice="required",
                parallel_tool_calls=False,
            ),
        ]
        (person, _), (obj, _), (yes_no, _), (call, done) = await asyncio.gather(
            *(answer(client, r) for r in requests)
        )
        check_person(person)
        assert isinstance(json.loads(obj), dict)
        assert yes_no in ("yes", "no")
        assert call.startswith("<tool_call>") and call.rstrip().endswith("</tool_call>")
        body = json.loads(call.strip()[len("<tool_call>") : -len("</tool_call>")])
        assert body["name"] == "get_weather" and isinstance(body["arguments"]["city"], str)
        assert done.finish_reason is FinishReason.STOP
        with pytest.raises(BadRequest, match="JSON schema"):
            await answer(
                client, GenerateRequest(model="onnx", prompt="x", sampling=greedy(json_schema="{"))
            )
