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
``repeat_penalty``, ``ignore_eos`` (benchmarks: end-of-generation tokens are
never chosen, as in llama.cpp, so the text runs to ``max_tokens``), ``priority`` (the scheduling class, -100..100, capped by the
credential's) and ``keep_alive`` (seconds or a duration such as ``"5m"``).
A ``seed`` is taken modulo 2**32. Sampling options the request leaves out come
from the model's Modelfile, then the server's defaults.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
with the HTTP status of the FerrousForge error code; ``code`` is that code
(``model_not_found``, ``bad_request``…). An error after a stream has started is
sent as a ``data: {"error": …}`` event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import TYPE_CHECKING

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import TokenDelta
from gateway.generation import (
    embed,
    for_vision,
    prepare,
    samples,
)
from gateway.http_common import (
    ClosingStream,
    post_route,
    read_body,
)
from gateway.http_common import unless_disconnected as _unless_disconnected
from gateway.openai_requests import (
    chat_messages,
    completion_prompt,
    embedding_inputs,
    keep_alive_of,
    refuse_chat_extras,
    refuse_completion_extras,
    response_format,
    sampling_options,
    tool_use,
)
from gateway.openai_stream import (
    Piece,
    collect_all,
    sse_body,
    start_stream,
    stream_samples,
)
from gateway.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    SamplingBody,
)
from gateway.openai_wire import (
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
from gateway.toolcalls import TextPiece, ToolCallReader

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

# -- routes ---------------------------------------------------------------------------


def openai_routes(gateway: Gateway) -> list[Route]:
    """The OpenAI-compatible routes, bound to ``gateway``."""
    fingerprint = f"ferrousforge-{gateway.version}"

    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_body(gateway, request, ChatCompletionRequest)
        refuse_chat_extras(body)
        messages = await for_vision(chat_messages(body))
        tools = tool_use(body)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        options = sampling_options(body, body.max_completion_tokens or body.max_tokens, logprobs)
        extra = response_format(body)
        keep_alive = keep_alive_of(body)
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
                request, collect_all(gateway, samples(prepared, n))
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
            return await stream_samples(
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
        stream = await start_stream(request, gateway, prepared)
        lead = base([{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}])
        return ClosingStream(
            sse_body(
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
        refuse_completion_extras(body)
        prompt = completion_prompt(body)
        # OpenAI's default for the legacy completions API is 16 tokens.
        options = sampling_options(body, body.max_tokens or 16, body.logprobs)
        keep_alive = keep_alive_of(body)
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
                request, collect_all(gateway, samples(prepared, n))
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
            return await stream_samples(
                request,
                gateway,
                samples(prepared, n),
                chunk,
                include_usage=_include_usage(body),
                usage_chunk=usage_chunk,
                tools=False,
                lead=lambda i: sse(chunk(prefix, None, i)) if prefix else None,
            )
        stream = await start_stream(request, gateway, prepared)
        return ClosingStream(
            sse_body(
                stream,
                chunk,
                lead=sse(chunk(prefix, None)) if prefix else None,
                include_usage=_include_usage(body),
                usage_chunk=usage_chunk,
            )
        )

    async def embeddings(request: Request) -> Response:
        body = await read_body(gateway, request, EmbeddingsRequest)
        inputs = embedding_inputs(body)
        keep_alive = keep_alive_of(body)

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
