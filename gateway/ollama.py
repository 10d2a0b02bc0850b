"""The Ollama-compatible API under ``/api``: existing Ollama clients work unchanged.

Translation only: requests become :func:`gateway.generation.prepare` calls and
store operations; engine events become Ollama's JSON objects. Streaming
responses are NDJSON (one object per line, ``stream`` defaults to true as in
Ollama); an error after the stream started arrives as an ``{"error": ...}``
line. Durations are nanoseconds.

What differs from Ollama, on purpose:

* ``template`` per request is refused (400): templates are Jinja2 chat
  templates set at load time; create a model with a ``TEMPLATE`` line instead.
* ``images`` on chat and generate go to a vision language model (a GGUF model with
  its projector); any other model refuses them (400, saying where images do go).
  ``suffix`` is refused.
* ``tools``: any model may call them (the generic format of :mod:`engine.tools`
  where its template has none), and a call's arguments always match the
  tool's schema; streamed calls arrive whole, one chunk per call.
* ``options.num_ctx`` applies when the request loads the model; a model that
  is already loaded keeps its context.
* Options we do not use (``mirostat``, ``num_gpu``…) are accepted and ignored,
  as Ollama ignores options a backend lacks; options of the wrong type are 400.
* ``priority`` (generate and chat, -100..100, capped by the credential) is this
  server's scheduling class; error bodies carry a typed ``code`` (and
  ``retry_after`` for limits that clear) beside Ollama's ``error``.

Auth is the server's (Bearer JWT or API key); a loopback client (no proxy
headers, no foreign browser origin) needs none while
``auth.loopback_without_token`` is on (the default), since Ollama clients
usually send none.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import ChatMessage, GenerationDone, TokenDelta
from engine.images import decode_image, embedding_input
from gateway.auth import Principal
from gateway.generation import (
    Prepared,
    collect,
    for_vision,
    format_options,
    logprob_json,
    prepare,
    raise_if_failed,
    started,
)
from gateway.generation import (
    embed as embed_with,
)
from gateway.http_common import (
    ClosingStream,
    guarded,
    http_status,
    loopback_without_token,
    read_body,
    unless_disconnected,
)
from gateway.ollama_models import NDJSON, ndjson_line, ollama_model_routes
from gateway.ollama_types import (
    ChatBody,
    EmbedBody,
    Format,
    GenerateBody,
    KeepAlive,
    LegacyEmbedBody,
    Options,
)
from gateway.toolcalls import ReadCall, TextPiece, ToolCallReader
from protocol import messages as m
from protocol.durations import parse_duration
from protocol.errors import BadRequest, FerrousError, ModelNotFound

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = ["ollama_error", "ollama_routes"]

_NS = 1_000_000  # ms -> ns


def _ollama_calls(calls: list[ReadCall]) -> list[dict[str, Any]]:
    """Calls as Ollama sends them: arguments as an object."""
    return [
        {"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments_object()}}
        for i, c in enumerate(calls)
    ]


def ollama_error(exc: FerrousError) -> JSONResponse:
    """Ollama's error shape (``error``), with this server's typed ``code`` beside it and
    ``retry_after`` when a retry can succeed later (Ollama's clients read ``error``)."""
    body: dict[str, object] = {"error": exc.message, "code": exc.code.value}
    if exc.retry_after is not None:
        body["retry_after"] = exc.retry_after
    return JSONResponse(body, status_code=http_status(exc))


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _images(images: list[str] | None) -> list[bytes] | None:
    """Ollama's base64 images, decoded (checked and sized by ``for_vision``)."""
    out = []
    for i, text in enumerate(images or ()):
        try:
            out.append(decode_image(text))
        except FerrousError as exc:
            raise type(exc)(f"image {i}: {exc.message}") from None
    return out or None


def _keep_alive(value: KeepAlive) -> float | None:
    return None if value is None else parse_duration(value)


def _sampling(options: Options | None, fmt: Format) -> tuple[m.Options | None, dict[str, object]]:
    extra = format_options(fmt or None)
    if options is None:
        return None, extra
    stop = [options.stop] if isinstance(options.stop, str) else options.stop
    max_tokens = options.num_predict
    if max_tokens is not None and max_tokens < 0:
        max_tokens = None  # -1: no limit; -2: until the context is full
    if max_tokens == 0:
        max_tokens = 1
    try:
        opts = msgspec.convert(
            {
                "temperature": options.temperature,
                "top_k": options.top_k,
                "top_p": options.top_p,
                "min_p": options.min_p,
                "seed": None if options.seed is None or options.seed < 0 else options.seed,
                "stop": stop,
                "max_tokens": max_tokens,
                "repeat_penalty": options.repeat_penalty,
            },
            m.Options,
        )
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid options: {exc}") from None
    return opts, extra


def _done_fields(done: GenerationDone) -> dict[str, Any]:
    t = done.timings
    reason = {"stop": "stop", "length": "length"}.get(done.finish_reason.value, "stop")
    return {
        "done": True,
        "done_reason": reason,
        "total_duration": int(t.total_ms * _NS),
        "load_duration": int(t.load_ms * _NS),
        "prompt_eval_count": done.usage.prompt_tokens,
        "prompt_eval_duration": int(t.ttft_ms * _NS),
        "eval_count": done.usage.completion_tokens,
        "eval_duration": int(max(0.0, t.total_ms - t.ttft_ms) * _NS),
    }


def _refuse_unsupported(think: bool | str | None) -> None:
    if think not in (None, False, ""):
        raise BadRequest("this model does not support thinking")


def _with_logprobs(
    options: m.Options | None, logprobs: bool | None, top: int | None
) -> m.Options | None:
    """``logprobs`` (and ``top_logprobs`` alternatives) into the request's options."""
    if not logprobs:
        if top:
            raise BadRequest("top_logprobs needs logprobs: true")
        return options
    return msgspec.structs.replace(options or m.Options(), logprobs=top or 0)


def _logprobs_field(ev: TokenDelta) -> dict[str, Any]:
    if ev.logprobs is None:
        return {}
    return {"logprobs": [logprob_json(lp) for lp in ev.logprobs]}


def ollama_routes(gateway: Gateway) -> list[Route]:
    """The ``/api/*`` routes, bound to ``gateway``."""
    loopback = loopback_without_token(gateway)

    def route(path: str, fn: Any, method: str) -> Route:
        return Route(
            path, guarded(gateway, ollama_error, fn, allow_loopback=loopback), methods=[method]
        )

    # -- generation ---------------------------------------------------------------------

    async def load_only(
        principal: Principal, model: str, keep_alive: float | None, key: str
    ) -> Response:
        """Ollama's "empty prompt" requests: load the model (or unload it with keep_alive 0)."""
        if keep_alive == 0:
            with contextlib.suppress(ModelNotFound):
                await gateway.models_for(principal).unload(model)
            reason = "unload"
        else:
            await gateway.ensure_model(principal, model, keep_alive)
            reason = "load"
        body = {"model": model, "created_at": _now(), "done": True, "done_reason": reason}
        body[key] = {"role": "assistant", "content": ""} if key == "message" else ""
        return JSONResponse(body)

    async def respond(
        request: Request,
        prepared: Prepared,
        model: str,
        stream: bool,
        chat: bool,
        reader: ToolCallReader | None = None,
    ) -> Response:
        def piece(text: str, calls: list[ReadCall] | None = None) -> dict[str, Any]:
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if calls:
                    message["tool_calls"] = _ollama_calls(calls)
                return {"message": message}
            return {"response": text}

        if not stream:

            async def whole() -> Response:
                outcome = await collect(gateway, prepared)  # raises how it failed
                text, calls = outcome.text, None
                if reader is not None:
                    reader.feed(text)
                    reader.finish()
                    text, calls = reader.text, reader.calls
                body = {"model": model, "created_at": _now(), **piece(text, calls)}
                if outcome.logprobs is not None:
                    body["logprobs"] = [logprob_json(lp) for lp in outcome.logprobs]
                body.update(_done_fields(outcome.done))
                return JSONResponse(body)

            return await unless_disconnected(request, whole())

        events = await unless_disconnected(request, started(gateway, prepared))

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for ev in events:
                    if isinstance(ev, TokenDelta):
                        if reader is None:
                            yield ndjson_line(
                                {
                                    "model": model,
                                    "created_at": _now(),
                                    **piece(ev.text),
                                    **_logprobs_field(ev),
                                    "done": False,
                                }
                            )
                        else:
                            for line in tool_lines(reader, reader.feed(ev.text)):
                                yield line
                        continue
                    if reader is not None:
                        for line in tool_lines(reader, reader.finish()):
                            yield line
                    try:
                        raise_if_failed(ev)
                    except FerrousError as exc:
                        yield ndjson_line({"error": exc.message})
                        return
                    yield ndjson_line(
                        {"model": model, "created_at": _now(), **piece(""), **_done_fields(ev)}
                    )
            except FerrousError as exc:
                yield ndjson_line({"error": exc.message})
            finally:
                await events.aclose()

        def tool_lines(reader: ToolCallReader, pieces: list[Any]) -> list[bytes]:
            """Text as it comes; each call in one chunk once it is complete."""
            out = []
            for p in pieces:
                if isinstance(p, TextPiece):
                    out.append(
                        ndjson_line(
                            {"model": model, "created_at": _now(), **piece(p.text), "done": False}
                        )
                    )
            while reader.calls[len(sent) :]:
                call = reader.calls[len(sent)]
                sent.append(call)
                line = {"model": model, "created_at": _now(), **piece("", [call]), "done": False}
                line["message"]["tool_calls"][0]["function"]["index"] = len(sent) - 1
                out.append(ndjson_line(line))
            return out

        sent: list[ReadCall] = []
        return ClosingStream(lines(), media_type=NDJSON)

    async def generate(request: Request) -> Response:
        t0 = time.perf_counter()
        body = await read_body(gateway, request, GenerateBody)
        if body.template:
            raise BadRequest(
                "per-request templates are not supported: create a model with a TEMPLATE line"
            )
        if body.images and body.raw:
            raise BadRequest("images need a prompt the model's template renders (raw: false)")
        if body.suffix:
            raise BadRequest("suffix (fill-in-the-middle) is not supported by this server")
        _refuse_unsupported(body.think)
        keep_alive = _keep_alive(body.keep_alive)
        if not body.prompt and body.system is None:
            return await load_only(request.state.principal, body.model, keep_alive, "response")
        options, extra = _sampling(body.options, body.format)
        options = _with_logprobs(options, body.logprobs, body.top_logprobs)
        await _load_with_ctx(request.state.principal, body.model, body.options, keep_alive)
        if body.raw:
            prepared = await prepare(
                gateway,
                request.state.principal,
                body.model,
                prompt=body.prompt,
                options=options,
                extra=extra,
                keep_alive=keep_alive,
                priority=body.priority,
                started=t0,
            )
        else:
            turns = [ChatMessage("system", body.system)] if body.system else []
            turns.append(ChatMessage("user", body.prompt, images=_images(body.images)))
            turns = await for_vision(turns)
            prepared = await prepare(
                gateway,
                request.state.principal,
                body.model,
                messages=turns,
                options=options,
                extra=extra,
                keep_alive=keep_alive,
                priority=body.priority,
                started=t0,
            )
        return await respond(request, prepared, body.model, body.stream, chat=False)

    async def chat(request: Request) -> Response:
        t0 = time.perf_counter()
        body = await read_body(gateway, request, ChatBody)
        _refuse_unsupported(body.think)
        keep_alive = _keep_alive(body.keep_alive)
        if not body.messages:
            return await load_only(request.state.principal, body.model, keep_alive, "message")
        options, extra = _sampling(body.options, body.format)
        options = _with_logprobs(options, body.logprobs, body.top_logprobs)
        tools = body.tool_use()
        if tools is not None and extra:
            raise BadRequest("tools cannot be combined with format")
        await _load_with_ctx(request.state.principal, body.model, body.options, keep_alive)
        prepared = await prepare(
            gateway,
            request.state.principal,
            body.model,
            messages=await for_vision(
                [
                    msgspec.structs.replace(t.engine_message(i), images=_images(t.images))
                    if t.images
                    else t.engine_message(i)
                    for i, t in enumerate(body.messages)
                ]
            ),
            options=options,
            extra=extra,
            keep_alive=keep_alive,
            priority=body.priority,
            started=t0,
            tools=tools,
        )
        reader = ToolCallReader() if tools is not None else None
        return await respond(request, prepared, body.model, body.stream, chat=True, reader=reader)

    async def _load_with_ctx(
        principal: Principal, model: str, options: Options | None, keep_alive: float | None
    ) -> None:
        """``options.num_ctx`` applies when this request is the one that loads the model."""
        if options is None or options.num_ctx is None:
            return
        view = gateway.models_for(principal)
        if view.key_for(model) in gateway.engine.models():
            return
        await view.ensure(model, keep_alive=keep_alive, n_ctx=options.num_ctx)

    # -- embeddings -----------------------------------------------------------------------

    async def embed_texts(
        principal: Principal,
        model: str,
        texts: list[str | bytes],
        truncate: bool,
        keep_alive: float | None,
    ) -> tuple[list[list[float]], int, float, float]:
        t0 = time.perf_counter()
        result, load_s = await embed_with(
            gateway, principal, model, texts, truncate=truncate, keep_alive=keep_alive
        )
        return result.vectors, result.prompt_tokens, load_s, time.perf_counter() - t0

    async def embed(request: Request) -> Response:
        body = await read_body(gateway, request, EmbedBody)
        texts = [body.input] if isinstance(body.input, str) and body.input else body.input
        if isinstance(texts, str):  # "" with images only
            texts = []
        items = [embedding_input(t) for t in texts] + [decode_image(x) for x in body.images]
        truncate = body.truncate is not False
        vectors, tokens, load_s, total_s = await unless_disconnected(
            request,
            embed_texts(
                request.state.principal, body.model, items, truncate, _keep_alive(body.keep_alive)
            ),
        )
        if body.dimensions is not None and vectors and body.dimensions != len(vectors[0]):
            raise BadRequest(
                f"dimensions: this model's embeddings have {len(vectors[0])} dimensions"
            )
        return JSONResponse(
            {
                "model": body.model,
                "embeddings": vectors,
                "total_duration": int(total_s * 1e9),
                "load_duration": int(load_s * 1e9),
                "prompt_eval_count": tokens,
            }
        )

    async def embeddings_legacy(request: Request) -> Response:
        body = await read_body(gateway, request, LegacyEmbedBody)
        vectors, _, _, _ = await unless_disconnected(
            request,
            embed_texts(
                request.state.principal,
                body.model,
                [body.prompt],
                True,
                _keep_alive(body.keep_alive),
            ),
        )
        return JSONResponse({"embedding": vectors[0]})

    return [
        route("/api/generate", generate, "POST"),
        route("/api/chat", chat, "POST"),
        route("/api/embed", embed, "POST"),
        route("/api/embeddings", embeddings_legacy, "POST"),
        *ollama_model_routes(gateway, route),
    ]
