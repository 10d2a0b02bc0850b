"""The gRPC API (``gateway/grpcapi/ferrous.proto``): generations, chats, embeddings and
models over gRPC, on a port of its own (``[grpc] port``; HTTP/2 as gRPC needs it).

Every call authenticates as the HTTP routes do (a JWT or an API key in
``authorization: Bearer`` metadata) and runs through the same functions
(:func:`gateway.generation.prepare` and :func:`~gateway.generation.run`), so
quotas, priorities, fair shares, adapters and images hold alike. Errors are
status codes (:data:`STATUS`) with the server's message, and ``retry-after``
trailing metadata where one is known. Flow control is gRPC's own: a slow
reader holds the stream's window, and the engine's credit flow stops the
generation's tokens behind it. A deadline, a cancelled call and ``Cancel``
with the generation's id all stop it; ``Cancel`` ends the stream with a
``done`` of ``cancelled``, as the WebSocket does, on whichever node of a
deployment runs it (:mod:`gateway.redisbus`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import msgspec

from engine import ChatMessage, GenerationDone, TokenDelta
from gateway.auth import Principal, Unauthorized
from gateway.generation import (
    embed,
    for_vision,
    format_options,
    prepare,
    raise_if_failed,
    run,
)
from gateway.grpcapi import ferrous_pb2 as pb
from gateway.grpcapi import ferrous_pb2_grpc as pb_grpc
from gateway.redisbus import CancelNotice
from gateway.scopes import GENERATE, MODELS_READ, allows, require
from protocol import messages as m
from protocol.errors import BadRequest, ErrorCode, FerrousError

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = ["STATUS", "GrpcServer", "status_of"]

STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.OVERLOADED: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.STALLED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.ENGINE_ERROR: grpc.StatusCode.INTERNAL,
    ErrorCode.RESUME_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a request with images, or a batch of embeddings


def status_of(exc: FerrousError) -> grpc.StatusCode:
    return STATUS.get(exc.code, grpc.StatusCode.INTERNAL)


class _Stream:
    """One running stream, and whether a ``Cancel`` reached it.

    A cancel interrupts the stream's task only while it waits on the
    generation (inside this module's code). While the task is in grpc's own
    code, sending a message, a task cancel would be taken by grpc as the call
    going away: the stream would end with no status and the client would wait
    for its deadline. There the cancel is noted, and seen before the next wait.
    """

    __slots__ = ("stopping", "task", "waiting")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.stopping = False
        self.waiting = False

    def stop(self) -> None:
        self.stopping = True
        if self.waiting:
            self.task.cancel()


class _Service(pb_grpc.FerrousServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._g = gateway
        # Running streams by (tenant, user, id): what Cancel reaches, the caller's own only.
        self._running: dict[tuple[str | None, str, str], _Stream] = {}
        gateway.bus.listen(lambda n: self._stop((n.tenant, n.user, n.id)))

    def _stop(self, key: tuple[str | None, str, str]) -> bool:
        """Stop the stream of ``key`` if this node runs it; whether it did."""
        stream = self._running.get(key)
        if stream is None or stream.task.done() or stream.stopping:
            return False
        stream.stop()
        return True

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        auth = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                auth = value if isinstance(value, str) else value.decode()
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if auth and token is None:
            raise Unauthorized("authorization metadata must be 'Bearer <token>'")
        return self._g.auth.authenticate(token)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: FerrousError) -> None:
        if exc.retry_after is not None:
            context.set_trailing_metadata((("retry-after", f"{exc.retry_after:g}"),))
        await context.abort(status_of(exc), exc.message)

    # -- generations ------------------------------------------------------------------

    async def Generate(  # named as the proto names it
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        async for event in self._generate(request, None, context):
            yield event

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        messages = [
            ChatMessage(x.role, x.content, images=list(x.images) or None) for x in request.messages
        ]
        async for event in self._generate(request, messages, context):
            yield event

    async def _generate(
        self,
        request: pb.GenerateRequest | pb.ChatRequest,
        messages: list[ChatMessage] | None,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.GenerateEvent]:
        task = asyncio.current_task()
        assert task is not None
        stream = _Stream(task)
        key: tuple[str | None, str, str] | None = None
        try:
            principal = self._principal(context)
            require(principal.scopes, GENERATE, "generating")
            gen_id = request.id or "g-" + secrets.token_hex(8)
            key = (principal.tenant, principal.user, gen_id)
            if key in self._running:
                raise BadRequest(f"a generation {gen_id!r} of yours is running")
            self._running[key] = stream
            common: dict[str, Any] = {
                "options": _options(request),
                "extra": _format(request.format),
                "priority": request.priority,
                "adapters": [
                    m.AdapterChoice(a.name, a.scale if a.HasField("scale") else 1.0)
                    for a in request.adapters
                ]
                or None,
            }
            stream.waiting = True
            if messages is None:
                assert isinstance(request, pb.GenerateRequest)
                prepared = await prepare(
                    self._g, principal, request.model, prompt=request.prompt, **common
                )
            else:
                if not messages:
                    raise BadRequest("a chat needs at least one message")
                prepared = await prepare(
                    self._g, principal, request.model, messages=await for_vision(messages), **common
                )
            stream.waiting = False
            if stream.stopping:
                raise asyncio.CancelledError
            yield pb.GenerateEvent(started=pb.Started(id=gen_id, model=request.model))
            events = run(self._g, prepared)
            async with contextlib.aclosing(events):
                while True:
                    if stream.stopping:
                        raise asyncio.CancelledError
                    stream.waiting = True
                    try:
                        ev = await anext(events)
                    except StopAsyncIteration:
                        break
                    finally:
                        stream.waiting = False
                    if isinstance(ev, TokenDelta):
                        yield pb.GenerateEvent(delta=pb.Delta(text=ev.text, seq=ev.seq))
                    elif isinstance(ev, GenerationDone):
                        raise_if_failed(ev)
                        yield pb.GenerateEvent(done=_done(ev))
        except asyncio.CancelledError:
            if not stream.stopping:
                raise  # the call was cancelled, or its deadline passed: nothing to say
            if task.cancelling():
                task.uncancel()
            yield pb.GenerateEvent(done=pb.Done(finish_reason="cancelled"))
        except FerrousError as exc:
            await self._fail(context, exc)
        finally:
            stream.waiting = False
            if key is not None and self._running.get(key) is stream:
                del self._running[key]

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelReply:
        try:
            principal = self._principal(context)
        except FerrousError as exc:
            await self._fail(context, exc)
            raise  # pragma: no cover - abort raises
        key = (principal.tenant, principal.user, request.id)
        if self._stop(key):
            return pb.CancelReply(cancelled=True)
        # Not here: the stream may be on another node of the deployment.
        heard = await self._g.bus.cancel(CancelNotice(*key))
        return pb.CancelReply(cancelled=heard > 0)

    # -- embeddings and models ---------------------------------------------------------

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedReply:
        try:
            principal = self._principal(context)
            require(principal.scopes, GENERATE, "embedding")
            if not request.input:
                raise BadRequest("input needs at least one text")
            result, _ = await embed(
                self._g, principal, request.model, list(request.input), truncate=request.truncate
            )
        except FerrousError as exc:
            await self._fail(context, exc)
            raise  # pragma: no cover - abort raises
        return pb.EmbedReply(
            model=request.model,
            embeddings=[pb.Vector(values=v) for v in result.vectors],
            prompt_tokens=result.prompt_tokens,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsReply:
        try:
            principal = self._principal(context)
            if not allows(principal.scopes, GENERATE):
                require(principal.scopes, MODELS_READ, "listing models")
            view = self._g.models_for(principal)
            names = await asyncio.to_thread(view.names)
            loaded = {x.name for x in view.loaded()}
        except FerrousError as exc:
            await self._fail(context, exc)
            raise  # pragma: no cover - abort raises
        return pb.ListModelsReply(models=[pb.ModelInfo(name=n, loaded=n in loaded) for n in names])


def _options(request: pb.GenerateRequest | pb.ChatRequest) -> m.Options | None:
    if not request.HasField("options"):
        return None
    o = request.options
    given = {
        f: getattr(o, f)
        for f in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repeat_penalty",
            "seed",
            "max_tokens",
            "ignore_eos",
        )
        if o.HasField(f)
    }
    if o.stop:
        given["stop"] = list(o.stop)
    try:
        return msgspec.convert(given, m.Options)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"options: {exc}") from None


def _format(text: str) -> dict[str, object]:
    if not text:
        return {}
    if text == "json":
        return format_options("json")
    try:
        schema = msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise BadRequest('format is "json" or a JSON Schema as JSON text') from None
    return format_options(schema)


def _done(done: GenerationDone) -> pb.Done:
    t = done.timings
    return pb.Done(
        finish_reason=done.finish_reason.value,
        usage=pb.Usage(
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
            cached_tokens=done.usage.cached_tokens,
        ),
        timings=pb.Timings(
            load_ms=t.load_ms,
            queue_ms=t.queue_ms,
            ttft_ms=t.ttft_ms,
            total_ms=t.total_ms,
            decode_tok_s=t.decode_tok_s,
        ),
    )


class GrpcServer:
    """The gRPC API's server, on ``host:port`` (0: a free port, then :attr:`port`)."""

    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        pb_grpc.add_FerrousServicer_to_server(  # type: ignore[no-untyped-call]
            _Service(gateway), self._server
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_insecure_port(address)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float) -> None:
        """Stop taking calls; running ones get ``grace`` seconds, then are cancelled."""
        await self._server.stop(grace)
