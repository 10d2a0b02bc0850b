"""Native HTTP routes for generation: ``/v1/generate``, ``/v1/chat`` and ``/readyz``.

They take the WebSocket protocol's ``generate`` and ``chat`` messages as JSON
bodies (plus ``stream``) and answer with one JSON result or, streaming, with
Server-Sent Events whose events are the protocol's server messages. Errors are
the protocol's codes in a JSON body with a matching HTTP status, as on the
model routes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import ChatMessage, GenerationDone, TokenDelta
from gateway.auth import Principal
from gateway.generation import (
    Prepared,
    collect,
    format_options,
    prepare,
    started,
    with_seeds,
)
from gateway.http_common import ClosingStream, Handler, read_body, unless_disconnected
from gateway.http_common import guarded as _guarded
from gateway.scopes import ADMIN, allows
from protocol import messages as m
from protocol.durations import parse_duration
from protocol.errors import FerrousError, error_from_code

if TYPE_CHECKING:
    from gateway.interface import Gateway

from gateway.model_routes import native_error

__all__ = ["ChatBody", "GenerateBody", "GenerationResult", "generation_routes"]


class GenerateBody(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``POST /v1/generate``: the WebSocket ``generate`` message, plus ``stream``."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    prompt: Annotated[str, msgspec.Meta(max_length=4_000_000)]
    options: m.Options | None = None
    keep_alive: m.KeepAlive | None = None
    format: m.Format | None = None
    token_ids: bool = False
    stream: bool = False
    priority: m.Priority = 0
    adapters: m.Adapters | None = None


class ChatBody(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``POST /v1/chat``: the WebSocket ``chat`` message, plus ``stream``.

    With ``conversation`` the server keeps the conversation (per user, shared
    with the WebSocket); without it the request is stateless.
    """

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[m.ChatMessage], msgspec.Meta(min_length=1, max_length=1024)]
    conversation: m.ConversationId | None = None
    options: m.Options | None = None
    keep_alive: m.KeepAlive | None = None
    format: m.Format | None = None
    priority: m.Priority = 0
    adapters: m.Adapters | None = None
    token_ids: bool = False
    stream: bool = False


class GenerationResult(msgspec.Struct, omit_defaults=True):
    """The non-streaming answer of ``/v1/generate`` and ``/v1/chat``."""

    id: str
    model: str
    text: str
    finish_reason: str
    usage: m.Usage
    timings: m.Timings
    conversation: str | None = None
    token_ids: list[int] | None = None


_JSON = msgspec.json.Encoder()


def _sse_message(msg: m.ServerMessage) -> bytes:
    kind = type(msg).__struct_config__.tag
    return b"event: " + str(kind).encode() + b"\ndata: " + _JSON.encode(msg) + b"\n\n"


def _proto_done(gen_id: str, done: GenerationDone, conversation: str | None) -> m.Done:
    t = done.timings
    return m.Done(
        gen_id,
        done.finish_reason.value,
        m.Usage(done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.cached_tokens),
        m.Timings(t.load_ms, t.queue_ms, t.ttft_ms, t.total_ms, t.decode_tok_s),
        conversation,
    )


def generation_routes(gateway: Gateway) -> list[Route]:
    """``/v1/generate``, ``/v1/chat`` (JSON or SSE) and ``/readyz``."""

    def guarded(fn: Handler) -> Handler:
        return _guarded(gateway, native_error, fn)

    async def start(
        request: Request, body: GenerateBody | ChatBody
    ) -> tuple[Prepared, str | None, Callable[[str], None]]:
        """Prepare the generation; returns it, the conversation id and a commit callback."""
        keep_alive = None if body.keep_alive is None else parse_duration(body.keep_alive)
        extra = format_options(body.format)
        if isinstance(body, GenerateBody):
            prepared = await prepare(
                gateway,
                request.state.principal,
                body.model,
                prompt=body.prompt,
                options=body.options,
                extra=extra,
                keep_alive=keep_alive,
                token_ids=body.token_ids,
                priority=body.priority,
                adapters=body.adapters,
            )
            return prepared, None, lambda _text: None
        turns = [ChatMessage(x.role, x.content) for x in body.messages]
        if body.conversation is None:
            prepared = await prepare(
                gateway,
                request.state.principal,
                body.model,
                messages=turns,
                options=body.options,
                extra=extra,
                keep_alive=keep_alive,
                token_ids=body.token_ids,
                priority=body.priority,
                adapters=body.adapters,
            )
            return prepared, None, lambda _text: None
        principal = request.state.principal
        owner = (principal.tenant, principal.user)
        resolved = await gateway.ensure_model(principal, body.model, keep_alive)
        conv_id = body.conversation
        conv = await gateway.conversations.history(owner, conv_id, body.model)
        # A new conversation opens with the Modelfile's seeds, as on the WebSocket.
        new_turns = list(turns) if conv.messages else with_seeds(resolved, turns)
        prepared = await prepare(
            gateway,
            request.state.principal,
            body.model,
            messages=[*conv.messages, *new_turns],
            options=body.options,
            extra=extra,
            keep_alive=keep_alive,
            token_ids=body.token_ids,
            priority=body.priority,
            adapters=body.adapters,
            seed=False,
        )

        def commit(text: str) -> None:
            """The turn happened: keep the user's messages and the answer."""
            said = [ChatMessage("assistant", text)] if text else []
            gateway.conversations.append(owner, conv_id, [*new_turns, *said])

        return prepared, body.conversation, commit

    async def generate(request: Request) -> Response:
        body: GenerateBody | ChatBody
        if request.url.path.endswith("/chat"):
            body = await read_body(gateway, request, ChatBody)
        else:
            body = await read_body(gateway, request, GenerateBody)
        prepared, conversation, commit = await start(request, body)
        gen_id = prepared.request.request_id
        if body.stream:
            events = await unless_disconnected(request, started(gateway, prepared))
            return ClosingStream(_sse_generation(events, gen_id, body.model, conversation, commit))

        async def whole() -> GenerationResult:
            outcome = await collect(gateway, prepared)  # raises how it failed
            commit(outcome.text)
            d = _proto_done(gen_id, outcome.done, conversation)
            return GenerationResult(
                gen_id,
                body.model,
                outcome.text,
                d.finish_reason,
                d.usage,
                d.timings,
                conversation,
                outcome.token_ids if body.token_ids else None,
            )

        result = await unless_disconnected(request, whole())
        return Response(_JSON.encode(result), media_type="application/json")

    async def readyz(request: Request) -> Response:
        """Ready when not draining and every worker answers (no credential needed).

        Without a credential it says only that; an admin also gets the workers
        and the models they hold (model names are tenants' business).
        """
        health = await gateway.engine.health()
        ready = health.ok and not gateway.draining
        body: dict[str, Any] = {"status": "ready" if ready else "not ready"}
        try:
            caller: Principal | None = gateway.http_principal(request)
        except FerrousError:
            caller = None
        if caller is not None and allows(caller.scopes, ADMIN):
            body["workers"] = [
                {
                    "index": w.index,
                    "alive": w.alive,
                    "models": w.models,
                    "active": w.active,
                    "where": w.where,
                    "tokens_read_ahead": w.tokens_read_ahead,
                }
                for w in health.workers
            ]
            body["node"] = gateway.nodes.node_id
            try:
                body["nodes"] = [msgspec.to_builtins(n) for n in await gateway.nodes.nodes()]
            except Exception as exc:  # the shared store away: say so, stay ready
                body["nodes_error"] = str(exc)
        return JSONResponse(body, status_code=200 if ready else 503)

    return [
        Route("/readyz", readyz, methods=["GET"]),
        Route("/v1/generate", guarded(generate), methods=["POST"]),
        Route("/v1/chat", guarded(generate), methods=["POST"]),
    ]


async def _sse_generation(
    events: AsyncGenerator[TokenDelta | GenerationDone, None],
    gen_id: str,
    model: str,
    conversation: str | None,
    commit: Callable[[str], None],
) -> AsyncIterator[bytes]:
    """The WebSocket's events as Server-Sent Events: started, delta..., done (or error)."""
    yield _sse_message(m.Started(gen_id, model, conversation))
    parts: list[str] = []
    try:
        async for ev in events:
            if isinstance(ev, TokenDelta):
                parts.append(ev.text)
                yield _sse_message(m.Delta(gen_id, ev.seq, ev.text, ev.token_ids))
                continue
            if ev.error is not None:
                code = error_from_code(ev.error.code, ev.error.message).code
                yield _sse_message(m.Error(code, ev.error.message, gen_id, ev.error.retryable))
            elif ev.finish_reason.value in ("stop", "length"):
                commit("".join(parts))
            yield _sse_message(_proto_done(gen_id, ev, conversation))
    except FerrousError as exc:
        yield _sse_message(m.Error(exc.code, exc.message, gen_id, exc.retryable))
    finally:
        await events.aclose()
