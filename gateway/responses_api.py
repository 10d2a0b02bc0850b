"""OpenAI's Responses API: ``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}``.

A response is one model turn over ``input`` (text, or a list of items:
messages, earlier ``function_call`` items and their ``function_call_output``
results), with ``instructions`` as the system message. Its ``output`` is a
``message`` item (the text) and a ``function_call`` item per call the model
made (tools work as on chat completions: see :mod:`engine.tools`).

``previous_response_id`` continues from a stored response: the server keeps
each response (unless ``store: false``) with the whole conversation that led
to it, per user and bounded (``limits.max_stored_responses``, least recently
used dropped), so a client sends only the new input. Instructions do not
carry over, as in OpenAI's API. Another user's response ids are unknown (404).

Streaming (``stream: true``) sends Server-Sent Events with ``event:`` names
and a ``sequence_number``: ``response.created``, ``response.in_progress``,
then per output item ``response.output_item.added``, for text
``response.content_part.added``, ``response.output_text.delta``…
``response.output_text.done``, ``response.content_part.done``, for calls
``response.function_call_arguments.delta``…``.done``, then
``response.output_item.done``; finally ``response.completed`` (or
``response.incomplete`` at ``max_output_tokens``, ``response.failed`` on an
error) with the whole response.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import ChatMessage, FinishReason, GenerationDone, TokenDelta, ToolCall
from gateway.conversations import StoredResponse
from gateway.generation import collect, prepare, raise_if_failed, run
from gateway.http_common import (
    ClosingStream,
    guarded,
    loopback_without_token,
    read_body,
    unless_disconnected,
)
from gateway.openai_wire import InvalidParam, openai_error
from gateway.responses_types import ResponsesRequest, input_messages, tool_use_of
from gateway.toolcalls import CallArguments, CallStarted, TextPiece, ToolCallReader
from protocol import messages as m
from protocol.durations import parse_duration
from protocol.errors import BadRequest, FerrousError, NotFound

if TYPE_CHECKING:
    from gateway.generation import Prepared
    from gateway.interface import Gateway

__all__ = ["ResponsesRequest", "responses_routes"]


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class _Answer:
    """The response being built: its fixed fields, its output items, then its end."""

    def __init__(self, body: ResponsesRequest, rid: str) -> None:
        self.body = body
        self.id = rid
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None

    def json(self) -> dict[str, Any]:
        b = self.body
        choice = b.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "model": b.model,
            "output": self.output,
            "instructions": b.instructions,
            "previous_response_id": b.previous_response_id,
            "tools": [
                {
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    "strict": bool(t.strict),
                }
                for t in b.tools or []
            ],
            "tool_choice": msgspec.to_builtins(choice) if choice is not None else "auto",
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "temperature": b.temperature,
            "top_p": b.top_p,
            "max_output_tokens": b.max_output_tokens,
            "store": b.store,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": b.metadata or {},
            "usage": self.usage,
            "error": self.error,
            "incomplete_details": self.incomplete,
        }

    def end(self, done: GenerationDone) -> None:
        u = done.usage
        self.usage = {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        }
        if done.finish_reason is FinishReason.LENGTH:
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
        else:
            self.status = "completed"


def responses_routes(gateway: Gateway) -> list[Route]:
    """The Responses API routes, bound to ``gateway``."""

    def owner(request: Request) -> tuple[str | None, str]:
        principal = request.state.principal
        return (principal.tenant, principal.user)

    async def start(request: Request, body: ResponsesRequest) -> tuple[Prepared, list[ChatMessage]]:
        history: list[ChatMessage] = []
        if body.previous_response_id is not None:
            kept = gateway.responses.get(owner(request), body.previous_response_id)
            if kept is None:
                raise _NotFound(f"no response {body.previous_response_id!r}")
            history = list(kept.messages)
        turns = [*history, *input_messages(body.input)]
        system = [ChatMessage("system", body.instructions)] if body.instructions else []
        options = m.Options(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repeat_penalty=body.repeat_penalty,
            seed=None if body.seed is None else body.seed % 2**32,
            max_tokens=body.max_output_tokens,
        )
        try:
            keep_alive = None if body.keep_alive is None else parse_duration(body.keep_alive)
        except BadRequest as exc:
            raise InvalidParam("keep_alive", exc.message) from None
        prepared = await prepare(
            gateway,
            request.state.principal,
            body.model,
            messages=[*system, *turns],
            options=options,
            keep_alive=keep_alive,
            priority=body.priority or 0,
            request_id=_new_id("resp"),
            tools=tool_use_of(body),
        )
        return prepared, turns

    def keep(
        request: Request, answer: _Answer, turns: list[ChatMessage], reader: ToolCallReader
    ) -> None:
        if not answer.body.store:
            return
        said = ChatMessage(
            "assistant",
            reader.text,
            tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in reader.calls] or None,
        )
        gateway.responses.put(
            owner(request), answer.id, StoredResponse(answer.json(), [*turns, said])
        )

    async def create(request: Request) -> Response:
        body = await read_body(gateway, request, ResponsesRequest)
        prepared, turns = await start(request, body)
        answer = _Answer(body, prepared.request.request_id)
        reader = ToolCallReader()
        if not body.stream:
            outcome = await unless_disconnected(request, collect(gateway, prepared))
            reader.feed(outcome.text)
            reader.finish()
            if reader.text:
                answer.output.append(_message_item(_new_id("msg"), reader.text))
            for c in reader.calls:
                answer.output.append(
                    _call_item(_new_id("fc"), c.id, c.name, c.arguments, "completed")
                )
            answer.end(outcome.done)
            keep(request, answer, turns, reader)
            return _json(answer.json())
        events = run(gateway, prepared)
        try:
            first = await unless_disconnected(request, anext(events))
            if isinstance(first, GenerationDone):
                raise_if_failed(first)
        except BaseException:
            await events.aclose()
            raise
        return ClosingStream(stream(request, answer, turns, reader, first, events))

    async def stream(
        request: Request,
        answer: _Answer,
        turns: list[ChatMessage],
        reader: ToolCallReader,
        first: TokenDelta | GenerationDone,
        events: AsyncIterator[TokenDelta | GenerationDone],
    ) -> AsyncIterator[bytes]:
        seq = 0

        def sse(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            data = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return f"event: {kind}\ndata: ".encode() + msgspec.json.encode(data) + b"\n\n"

        msg: dict[str, Any] | None = None  # the open message item
        msg_index = -1
        calls_done = 0
        call_items: list[dict[str, Any]] = []

        def close_message() -> list[bytes]:
            nonlocal msg
            if msg is None:
                return []
            text = msg["content"][0]["text"]
            part = {"type": "output_text", "text": text, "annotations": []}
            item = _message_item(msg["id"], text)
            answer.output[msg_index] = item
            out = [
                sse(
                    "response.output_text.done",
                    item_id=msg["id"],
                    output_index=msg_index,
                    content_index=0,
                    text=text,
                ),
                sse(
                    "response.content_part.done",
                    item_id=msg["id"],
                    output_index=msg_index,
                    content_index=0,
                    part=part,
                ),
                sse("response.output_item.done", output_index=msg_index, item=item),
            ]
            msg = None
            return out

        def pieces(items: list[TextPiece | CallStarted | CallArguments]) -> list[bytes]:
            nonlocal msg, msg_index, calls_done
            out: list[bytes] = []
            for p in items:
                if isinstance(p, TextPiece):
                    if msg is None:
                        msg = _message_item(_new_id("msg"), "", "in_progress")
                        msg_index = len(answer.output)
                        answer.output.append(msg)
                        out.append(
                            sse("response.output_item.added", output_index=msg_index, item=msg)
                        )
                        out.append(
                            sse(
                                "response.content_part.added",
                                item_id=msg["id"],
                                output_index=msg_index,
                                content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []},
                            )
                        )
                    msg["content"][0]["text"] += p.text
                    out.append(
                        sse(
                            "response.output_text.delta",
                            item_id=msg["id"],
                            output_index=msg_index,
                            content_index=0,
                            delta=p.text,
                        )
                    )
                elif isinstance(p, CallStarted):
                    out += close_message()
                    item = _call_item(_new_id("fc"), p.id, p.name, "", "in_progress")
                    call_items.append(item)
                    answer.output.append(item)
                    out.append(
                        sse(
                            "response.output_item.added",
                            output_index=len(answer.output) - 1,
                            item=item,
                        )
                    )
                else:
                    item = call_items[p.index]
                    item["arguments"] += p.text
                    out.append(
                        sse(
                            "response.function_call_arguments.delta",
                            item_id=item["id"],
                            output_index=answer.output.index(item),
                            delta=p.text,
                        )
                    )
            while calls_done < len(reader.calls):
                call, item = reader.calls[calls_done], call_items[calls_done]
                calls_done += 1
                index = answer.output.index(item)
                done_item = _call_item(item["id"], call.id, call.name, call.arguments, "completed")
                answer.output[index] = done_item
                out.append(
                    sse(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        arguments=call.arguments,
                    )
                )
                out.append(sse("response.output_item.done", output_index=index, item=done_item))
            return out

        try:
            yield sse("response.created", response=answer.json())
            yield sse("response.in_progress", response=answer.json())
            ev: TokenDelta | GenerationDone | None = first
            done: GenerationDone | None = None
            while ev is not None:
                if isinstance(ev, GenerationDone):
                    done = ev
                    break
                for line in pieces(reader.feed(ev.text)):
                    yield line
                ev = await anext(events, None)
            if done is None:
                raise FerrousError("the generation ended without a result")
            raise_if_failed(done)
            for line in [*pieces(reader.finish()), *close_message()]:
                yield line
            answer.end(done)
            keep(request, answer, turns, reader)
            final = "response.incomplete" if answer.status == "incomplete" else "response.completed"
            yield sse(final, response=answer.json())
        except FerrousError as exc:
            answer.status = "failed"
            answer.error = {"code": exc.code.value, "message": exc.message}
            yield sse("error", code=exc.code.value, message=exc.message, param=None)
            yield sse("response.failed", response=answer.json())
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def get(request: Request) -> Response:
        kept = gateway.responses.get(owner(request), request.path_params["rid"])
        if kept is None:
            raise _NotFound(f"no response {request.path_params['rid']!r}")
        return _json(kept.body)

    async def delete(request: Request) -> Response:
        rid = request.path_params["rid"]
        if not gateway.responses.delete(owner(request), rid):
            raise _NotFound(f"no response {rid!r}")
        return _json({"id": rid, "object": "response", "deleted": True})

    loopback = loopback_without_token(gateway)

    def route(path: str, fn: Any, method: str) -> Route:
        return Route(
            path, guarded(gateway, openai_error, fn, allow_loopback=loopback), methods=[method]
        )

    return [
        route("/v1/responses", create, "POST"),
        route("/v1/responses/{rid}", get, "GET"),
        route("/v1/responses/{rid}", delete, "DELETE"),
    ]


class _NotFound(NotFound):
    """A 404 naming the response id (OpenAI's ``param`` is the id's field)."""


def _json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")
