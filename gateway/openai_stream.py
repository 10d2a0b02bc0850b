"""How the OpenAI surfaces run their generations: whole, or streamed as server-sent events.

Kept apart from :mod:`gateway.openai_api`, which parses requests and shapes
each chunk: this is the part that waits for a generation's first event before
the status line (so a request the engine refuses is still a plain HTTP error,
429 or 503 with ``Retry-After``), merges ``n`` samples into one stream with
each chunk naming its choice, reads tool calls out of the text as it comes,
and always ends a stream with ``[DONE]``, an error after the start included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from engine import GenerationDone, TokenDelta
from gateway.generation import Outcome, Prepared, collect, drain, run, start_samples
from gateway.http_common import ClosingStream
from gateway.http_common import unless_disconnected as _unless_disconnected
from gateway.openai_wire import DONE, error_json, finish_reason, sse, usage_json
from gateway.toolcalls import CallArguments, CallStarted, TextPiece, ToolCallReader
from protocol.errors import FerrousError

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = [
    "ChunkMaker",
    "Event",
    "Piece",
    "Started",
    "collect_all",
    "sse_body",
    "start_stream",
    "stream_samples",
]

Event = TokenDelta | GenerationDone


async def collect_all(gateway: Gateway, prepared: list[Prepared]) -> list[Outcome]:
    """Every sample to its end; if one fails, the others are cancelled and it raises."""
    if len(prepared) == 1:
        return [await collect(gateway, prepared[0])]
    gens = await start_samples(gateway, prepared)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(drain(g)) for g in gens]
    return [t.result() for t in tasks]


async def stream_samples(
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


class Started(msgspec.Struct):
    """A started generation: its first event is in hand, so it did not fail to start."""

    events: AsyncGenerator[Event, None]
    first: Event


async def start_stream(request: Request, gateway: Gateway, prepared: Prepared) -> Started:
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
    return Started(events, ev)


Piece = str | TokenDelta | TextPiece | CallStarted | CallArguments
ChunkMaker = Callable[[Piece | None, str | None], dict[str, object]]


async def sse_body(
    stream: Started,
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
