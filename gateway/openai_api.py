"""The OpenAI-compatible HTTP surface, so existing OpenAI clients and SDKs work unchanged.

Routes (all need the usual credential; the OpenAI SDKs send their ``api_key`` as
``Authorization: Bearer``, which takes a FerrousForge API key or JWT):

* ``POST /v1/chat/completions`` — stateless chats (the whole history comes with
  every request; the model's Modelfile SYSTEM and MESSAGE lines are put first).
  A content part list's text parts are joined with newlines; ``image_url`` parts
  (data URLs) of user messages go to a vision language model; other part types
  (audio) are refused. ``response_format`` ``json_object`` /
  ``json_schema`` constrain the output to JSON (a schema when one is given).
  ``tools`` with ``tool_choice`` (``auto``, ``none``, ``required`` or a named
  function) and ``parallel_tool_calls``: calls come back as
  ``message.tool_calls`` (streamed: ``delta.tool_calls``, id and name first,
  then argument pieces) with ``finish_reason: "tool_calls"``; their arguments
  always match the function's ``parameters`` schema (see :mod:`engine.tools`).
  ``tool`` messages with ``tool_call_id`` carry results back.
* ``POST /v1/completions`` — a raw prompt, no chat template. ``max_tokens``
  defaults to 16, as in OpenAI's API. ``echo`` puts the prompt before the text.
* ``POST /v1/embeddings`` — ``encoding_format`` ``float`` or ``base64``
  (little-endian float32, which the official Python client asks for by default).
* ``GET /v1/models`` and ``GET /v1/models/{name}`` are the native routes, which
  already answer in OpenAI's shape.

Both generation routes stream Server-Sent Events with ``"stream": true``
(``data: <chunk>`` lines, then ``data: [DONE]``); ``stream_options.include_usage``
adds a last chunk with ``usage`` and no choices. A client that goes away cancels
its generation, streaming or not.

``n`` (up to 16) gives that many choices: the first sample reads the prompt,
the others start once it has and copy its keys and values instead of reading
it again; with a ``seed``, sample ``i`` uses ``seed + i``.

``logprobs`` / ``top_logprobs`` (chat: up to 20 alternatives) and ``logprobs``
(completions: up to 5, the legacy parallel lists) give each generated token's
log-probability under the model, streamed with the token's chunk.

Refused with a 400 that names the parameter, rather than silently ignored:
``best_of`` other than 1, the legacy ``functions`` and
``function_call`` fields, tools together with ``response_format``, completion ``suffix`` and token-array prompts or inputs, and
``dimensions`` other than the model's own size. Accepted and ignored:
``presence_penalty`` and ``frequency_penalty`` (range-checked; the engine's own
``repeat_penalty`` is offered instead), ``user``, ``metadata``, ``store`` and any
field this surface does not know. Extensions: ``top_k``, ``min_p``,
``repeat_penalty``, ``ignore_eos`` (benchmarks: keep generating past the end of
the answer), ``priority`` (the scheduling class, -100..100, capped by the
credential's) and ``keep_alive`` (seconds or a duration such as ``"5m"``).
A ``seed`` is taken modulo 2**32. Sampling options the request leaves out come
from the model's Modelfile, then the server's defaults.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
with the HTTP status of the FerrousForge error code; ``code`` is that code
(``model_not_found``, ``bad_request``…). An error after a stream has started is
sent as a ``data: {"error": …}`` event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Literal

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import ChatMessage, GenerationDone, TokenDelta, ToolCall, ToolFunction
from engine.images import decode_image, embedding_input
from gateway.generation import (
    MAX_SAMPLES,
    Outcome,
    Prepared,
    ToolUse,
    collect,
    drain,
    embed,
    for_vision,
    format_options,
    prepare,
    run,
    samples,
    start_samples,
)
from gateway.http_common import (
    ClosingStream,
    post_route,
    read_body,
)
from gateway.http_common import unless_disconnected as _unless_disconnected
from gateway.openai_types import (
    ChatCompletionMessage,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    NamedToolChoice,
    SamplingBody,
)
from gateway.openai_wire import (
    DONE,
    InvalidParam,
    chat_logprobs,
    error_json,
    finish_reason,
    json_response,
    legacy_logprobs,
    openai_error,
    sse,
    tool_calls_json,
    tool_delta,
    usage_json,
)
from gateway.toolcalls import CallArguments, CallStarted, TextPiece, ToolCallReader
from protocol import messages as m
from protocol.durations import parse_duration
from protocol.errors import (
    BadRequest,
    FerrousError,
)

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingsRequest",
    "InvalidParam",
    "error_json",
    "openai_error",
    "openai_routes",
]

Event = TokenDelta | GenerationDone

# -- errors ---------------------------------------------------------------------------


# -- translating requests -------------------------------------------------------------


def _options(body: SamplingBody, max_tokens: int | None, logprobs: int | None = None) -> m.Options:
    if body.n is not None and not 1 <= body.n <= MAX_SAMPLES:
        raise InvalidParam("n", f"n must be between 1 and {MAX_SAMPLES}")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return m.Options(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        seed=None if body.seed is None else body.seed % 2**32,
        max_tokens=max_tokens,
        stop=stop,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def _keep_alive(body: SamplingBody | EmbeddingsRequest) -> float | None:
    if body.keep_alive is None:
        return None
    try:
        return parse_duration(body.keep_alive)
    except BadRequest as exc:
        raise InvalidParam("keep_alive", exc.message) from None


def _chat_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    if not body.messages:
        raise InvalidParam("messages", "messages must hold at least one message")
    out: list[ChatMessage] = []
    for i, msg in enumerate(body.messages):
        where = f"messages[{i}]"
        role = "system" if msg.role == "developer" else msg.role
        if role == "function" or msg.function_call is not None:
            raise InvalidParam(
                f"{where}.role", "the legacy function-calling fields are not supported: use tools"
            )
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidParam(
                f"{where}.role", f"unknown role {msg.role!r}: use system, user, assistant or tool"
            )
        if role == "tool":
            if not msg.tool_call_id:
                raise InvalidParam(f"{where}.tool_call_id", "a tool message needs tool_call_id")
            out.append(ChatMessage("tool", _content(msg, where), tool_call_id=msg.tool_call_id))
            continue
        calls = None
        if msg.tool_calls:
            if role != "assistant":
                raise InvalidParam(f"{where}.tool_calls", "only assistant messages make calls")
            calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls]
        text, images = _parts(msg, where)
        if images and role != "user":
            raise InvalidParam(f"{where}.content", "only user messages show images")
        out.append(ChatMessage(role, text, tool_calls=calls, images=images or None))
    return out


def _tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's tools and tool choice, for the engine (None: no tools)."""
    choice = body.tool_choice
    if not body.tools:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise InvalidParam("tool_choice", "tool_choice needs tools")
        return None
    tools = [
        ToolFunction(
            t.function.name,
            t.function.description or "",
            json.dumps(t.function.parameters) if t.function.parameters is not None else "",
        )
        for t in body.tools
    ]
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in {t.name for t in tools}:
        raise InvalidParam("tool_choice", f"no tool is named {named!r}")
    mode: Literal["auto", "required", "none"] = (
        "auto" if choice is None or isinstance(choice, NamedToolChoice) else choice
    )
    parallel = body.parallel_tool_calls is not False
    return ToolUse(tools, mode, named, parallel)


def _content(msg: ChatCompletionMessage, where: str) -> str:
    return _parts(msg, where)[0]


def _parts(msg: ChatCompletionMessage, where: str) -> tuple[str, list[bytes]]:
    """A message's text, and the images of its ``image_url`` parts (decoded, unchecked)."""
    if isinstance(msg.content, str):
        return msg.content, []
    if msg.content is None:
        if msg.role == "assistant":
            return "", []
        raise InvalidParam(f"{where}.content", "content is required")
    texts: list[str] = []
    images: list[bytes] = []
    for k, part in enumerate(msg.content):
        if part.type == "image_url" and part.image_url is not None:
            url = part.image_url.url
            if not url.startswith("data:image/"):
                raise InvalidParam(
                    f"{where}.content[{k}].image_url",
                    "an image must be sent as a data:image/...;base64, URL",
                )
            try:
                images.append(decode_image(url))
            except FerrousError as exc:
                raise InvalidParam(f"{where}.content[{k}].image_url", exc.message) from None
        elif part.type == "text" and part.text is not None:
            texts.append(part.text)
        else:
            raise InvalidParam(
                f"{where}.content", f"content parts of type {part.type!r} are not supported"
            )
    return "\n".join(texts), images


def _format(body: ChatCompletionRequest) -> dict[str, object]:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object" or fmt.json_schema is None or fmt.json_schema.schema is None:
        return format_options("json")
    return format_options(fmt.json_schema.schema)


def _refuse_chat_extras(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParam("top_logprobs", "top_logprobs needs logprobs: true")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise InvalidParam("top_logprobs", "top_logprobs must be between 0 and 20")
    if body.functions:
        raise InvalidParam("functions", "the legacy functions field is not supported: use tools")
    if body.tools and body.response_format is not None and body.response_format.type != "text":
        raise InvalidParam("response_format", "tools cannot be combined with response_format")


def _prompt(body: CompletionRequest) -> str:
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(x, str) for x in prompt):
        raise InvalidParam("prompt", "send one prompt per request (a batch is not supported)")
    raise InvalidParam("prompt", "prompt must be a string (token arrays are not supported)")


def _refuse_completion_extras(body: CompletionRequest) -> None:
    if body.suffix:
        raise InvalidParam("suffix", "suffix (fill-in-the-middle) is not supported")
    if body.best_of is not None and body.best_of != 1:
        raise InvalidParam("best_of", "only best_of=1 is supported")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise InvalidParam("logprobs", "logprobs must be between 0 and 5")


def _inputs(body: EmbeddingsRequest) -> list[str | bytes]:
    """The inputs in order: texts, and images (``data:image/...`` URLs in ``input``, then
    the ``images`` extension's base64 or data URLs) as their bytes."""
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs and not body.images:
        raise InvalidParam("input", "input must not be empty")
    for x in inputs:
        if not isinstance(x, str):
            raise InvalidParam("input", "input must be text (token arrays are not supported)")
        if not x:
            raise InvalidParam("input", "input must not hold empty strings")
    return [embedding_input(x) for x in inputs if isinstance(x, str)] + [
        decode_image(x) for x in body.images
    ]


# -- generation -----------------------------------------------------------------------


async def _collect_all(gateway: Gateway, prepared: list[Prepared]) -> list[Outcome]:
    """Every sample to its end; if one fails, the others are cancelled and it raises."""
    if len(prepared) == 1:
        return [await collect(gateway, prepared[0])]
    gens = await start_samples(gateway, prepared)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(drain(g)) for g in gens]
    return [t.result() for t in tasks]


async def _stream_samples(
    request: Request,
    gateway: Gateway,
    prepared: list[Prepared],
    chunk: Callable[[Piece | None, str | None, int], dict[str, object]],
    *,
    include_usage: bool,
    usage_chunk: Callable[[dict[str, object]], dict[str, object]],
    tools: bool,
    lead: Callable[[int], bytes | None],
) -> Response:
    """Start the samples (a refusal is still a plain HTTP error) and stream them as one."""
    gens = await _unless_disconnected(request, start_samples(gateway, prepared))
    return ClosingStream(
        _sse_samples(
            gens,
            chunk,
            include_usage=include_usage,
            usage_chunk=usage_chunk,
            readers=[ToolCallReader() if tools else None for _ in gens],
            lead=lead,
        )
    )


async def _sse_samples(
    gens: list[AsyncGenerator[Event, None]],
    chunk: Callable[[Piece | None, str | None, int], dict[str, object]],
    *,
    include_usage: bool,
    usage_chunk: Callable[[dict[str, object]], dict[str, object]],
    readers: list[ToolCallReader | None],
    lead: Callable[[int], bytes | None],
) -> AsyncIterator[bytes]:
    """Several streamed samples as one SSE stream, each chunk naming its choice ``index``."""
    queue: asyncio.Queue[tuple[int, Event | FerrousError]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[Event, None]) -> None:
        try:
            async for ev in gen:
                await queue.put((i, ev))
        except FerrousError as exc:
            await queue.put((i, exc))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    dones: dict[int, GenerationDone] = {}
    try:
        for i in range(len(gens)):
            first = lead(i)
            if first is not None:
                yield first
        while len(dones) < len(gens):
            i, ev = await queue.get()
            if isinstance(ev, FerrousError):
                raise ev
            reader = readers[i]
            if isinstance(ev, GenerationDone):
                if reader is not None:
                    for piece in reader.finish():
                        yield sse(chunk(piece, None, i))
                yield sse(chunk(None, finish_reason(ev, reader), i))
                dones[i] = ev
            elif ev.text:
                pieces: list[Piece] = [ev] if reader is None else [*reader.feed(ev.text)]
                for text_or_call in pieces:
                    yield sse(chunk(text_or_call, None, i))
        if include_usage:
            ordered = [dones[i] for i in range(len(gens))]
            yield sse(usage_chunk(usage_json(*ordered)))
    except FerrousError as exc:
        yield sse(error_json(exc))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    yield DONE


class _Stream(msgspec.Struct):
    """A started generation: its first event is in hand, so it did not fail to start."""

    events: AsyncGenerator[Event, None]
    first: Event


async def _start(request: Request, gateway: Gateway, prepared: Prepared) -> _Stream:
    """Wait for the first event, so a request the engine refuses is still a plain HTTP error."""
    events = run(gateway, prepared)

    async def first() -> Event:
        return await anext(events)

    try:
        ev = await _unless_disconnected(request, first())
        if isinstance(ev, GenerationDone):
            finish_reason(ev)  # raises when it failed before producing anything
    except BaseException:
        await events.aclose()
        raise
    return _Stream(events, ev)


Piece = str | TokenDelta | TextPiece | CallStarted | CallArguments
ChunkMaker = Callable[[Piece | None, str | None], dict[str, object]]


async def _sse_body(
    stream: _Stream,
    chunk: ChunkMaker,
    *,
    lead: bytes | None,
    include_usage: bool,
    usage_chunk: Callable[[dict[str, object]], dict[str, object]],
    reader: ToolCallReader | None = None,
) -> AsyncIterator[bytes]:
    """The events of one streamed generation: ``lead``, text chunks, finish, usage, [DONE].

    With ``reader`` (a chat with tools) the text goes through it, and calls go
    out as ``delta.tool_calls`` pieces.
    """
    try:
        if lead is not None:
            yield lead
        done: GenerationDone | None = None
        ev: Event | None = stream.first
        while ev is not None:
            if isinstance(ev, GenerationDone):
                done = ev
                break
            if ev.text:
                if reader is None:
                    yield sse(chunk(ev, None))
                else:
                    for piece in reader.feed(ev.text):
                        yield sse(chunk(piece, None))
            ev = await anext(stream.events, None)
        if done is None:
            raise FerrousError("the generation ended without a result")
        if reader is not None:
            for piece in reader.finish():
                yield sse(chunk(piece, None))
        yield sse(chunk(None, finish_reason(done, reader)))
        if include_usage:
            yield sse(usage_chunk(usage_json(done)))
    except FerrousError as exc:
        yield sse(error_json(exc))
    finally:
        await stream.events.aclose()
    yield DONE


# -- routes ---------------------------------------------------------------------------


def openai_routes(gateway: Gateway) -> list[Route]:
    """The OpenAI-compatible routes, bound to ``gateway``."""
    fingerprint = f"ferrousforge-{gateway.version}"

    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_body(gateway, request, ChatCompletionRequest)
        _refuse_chat_extras(body)
        messages = await for_vision(_chat_messages(body))
        tools = _tool_use(body)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        options = _options(body, body.max_completion_tokens or body.max_tokens, logprobs)
        extra = _format(body)
        keep_alive = _keep_alive(body)
        cid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        prepared = await prepare(
            gateway,
            request.state.principal,
            body.model,
            messages=messages,
            options=options,
            extra=extra,
            keep_alive=keep_alive,
            priority=body.priority or 0,
            request_id=cid,
            started=started,
            tools=tools,
        )
        use_tools = tools is not None and tools.active
        reader = ToolCallReader() if use_tools else None
        n = body.n or 1
        if not body.stream:
            outcomes = await _unless_disconnected(
                request, _collect_all(gateway, samples(prepared, n))
            )
            choices = []
            for i, outcome in enumerate(outcomes):
                said = ToolCallReader() if use_tools else None
                message: dict[str, object] = {"role": "assistant", "content": outcome.text}
                if said is not None:
                    said.feed(outcome.text)
                    said.finish()
                    message["content"] = said.text if said.text or not said.calls else None
                    if said.calls:
                        message["tool_calls"] = tool_calls_json(said)
                choices.append(
                    {
                        "index": i,
                        "message": message,
                        "finish_reason": finish_reason(outcome.done, said),
                        "logprobs": None if said is not None else chat_logprobs(outcome.logprobs),
                    }
                )
            return json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": body.model,
                    "choices": choices,
                    "usage": usage_json(*(o.done for o in outcomes)),
                    "system_fingerprint": fingerprint,
                }
            )

        def chunk(piece: Piece | None, finish: str | None, index: int = 0) -> dict[str, object]:
            delta: dict[str, object]
            logprobs = None
            if piece is None:
                delta = {}
            elif isinstance(piece, TokenDelta):
                delta = {"content": piece.text}
                logprobs = chat_logprobs(piece.logprobs)
            elif isinstance(piece, str | TextPiece):
                delta = {"content": piece if isinstance(piece, str) else piece.text}
            else:
                delta = tool_delta(piece)
            return base(
                [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
            )

        def base(choices: list[dict[str, object]]) -> dict[str, object]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "system_fingerprint": fingerprint,
                "choices": choices,
            }

        def usage_chunk(usage: dict[str, object]) -> dict[str, object]:
            return {**base([]), "usage": usage}

        # The first chunk of a choice carries the role; the others content, then the finish.
        role = {"role": "assistant", "content": ""}
        if n > 1:
            return await _stream_samples(
                request,
                gateway,
                samples(prepared, n),
                chunk,
                include_usage=_include_usage(body),
                usage_chunk=usage_chunk,
                tools=use_tools,
                lead=lambda i: sse(
                    base([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
                ),
            )
        stream = await _start(request, gateway, prepared)
        lead = base([{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}])
        return ClosingStream(
            _sse_body(
                stream,
                chunk,
                lead=sse(lead),
                include_usage=_include_usage(body),
                usage_chunk=usage_chunk,
                reader=reader,
            )
        )

    async def completions(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_body(gateway, request, CompletionRequest)
        _refuse_completion_extras(body)
        prompt = _prompt(body)
        # OpenAI's default for the legacy completions API is 16 tokens.
        options = _options(body, body.max_tokens or 16, body.logprobs)
        keep_alive = _keep_alive(body)
        cid = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        prepared = await prepare(
            gateway,
            request.state.principal,
            body.model,
            prompt=prompt,
            options=options,
            keep_alive=keep_alive,
            priority=body.priority or 0,
            request_id=cid,
            started=started,
        )
        prefix = prompt if body.echo else ""

        def base(choices: list[dict[str, object]]) -> dict[str, object]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": fingerprint,
                "choices": choices,
            }

        n = body.n or 1
        if not body.stream:
            outcomes = await _unless_disconnected(
                request, _collect_all(gateway, samples(prepared, n))
            )
            choices: list[dict[str, object]] = [
                {
                    "text": prefix + outcome.text,
                    "index": i,
                    "logprobs": legacy_logprobs(outcome.logprobs, len(prefix)),
                    "finish_reason": finish_reason(outcome.done),
                }
                for i, outcome in enumerate(outcomes)
            ]
            return json_response(
                {**base(choices), "usage": usage_json(*(o.done for o in outcomes))}
            )

        offsets = [len(prefix)] * n  # text_offset of each choice's next token

        def chunk(piece: Piece | None, finish: str | None, index: int = 0) -> dict[str, object]:
            text, logprobs = piece if isinstance(piece, str) else "", None
            if isinstance(piece, TokenDelta):
                text = piece.text
                logprobs = legacy_logprobs(piece.logprobs, offsets[index])
                offsets[index] += len(text)
            choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
            return base([choice])

        def usage_chunk(usage: dict[str, object]) -> dict[str, object]:
            return {**base([]), "usage": usage}

        if n > 1:
            return await _stream_samples(
                request,
                gateway,
                samples(prepared, n),
                chunk,
                include_usage=_include_usage(body),
                usage_chunk=usage_chunk,
                tools=False,
                lead=lambda i: sse(chunk(prefix, None, i)) if prefix else None,
            )
        stream = await _start(request, gateway, prepared)
        return ClosingStream(
            _sse_body(
                stream,
                chunk,
                lead=sse(chunk(prefix, None)) if prefix else None,
                include_usage=_include_usage(body),
                usage_chunk=usage_chunk,
            )
        )

    async def embeddings(request: Request) -> Response:
        body = await read_body(gateway, request, EmbeddingsRequest)
        inputs = _inputs(body)
        keep_alive = _keep_alive(body)

        result, _ = await _unless_disconnected(
            request,
            embed(
                gateway,
                request.state.principal,
                body.model,
                inputs,
                truncate=body.truncate,
                keep_alive=keep_alive,
            ),
        )
        vectors = result.vectors
        size = len(vectors[0]) if vectors else 0
        if body.dimensions is not None and body.dimensions != size:
            raise InvalidParam(
                "dimensions",
                f"this model's embeddings have {size} dimensions, not {body.dimensions}",
            )
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return json_response({"object": "list", "data": data, "model": body.model, "usage": usage})

    return [
        post_route(gateway, "/v1/chat/completions", chat_completions, openai_error),
        post_route(gateway, "/v1/completions", completions, openai_error),
        post_route(gateway, "/v1/embeddings", embeddings, openai_error),
    ]


def _include_usage(body: SamplingBody) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
