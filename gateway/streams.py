"""One generation of a WebSocket session, from its request to its ``done``.

:class:`GenerationStreams` is the half of :class:`gateway.sessions.Session`
that runs a ``generate``, ``chat`` or ``pull``: it prepares the request
(model, conversation, tools), streams the engine's events as protocol
messages (text held back while it may open a tool call, credit taken per
delta), commits the turn to its conversation once it is answered, and says
how it ended. The other half (the connection, hello, resume, cancel) stays in
:mod:`gateway.sessions`; what this half needs of it is declared below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import msgspec

from engine import (
    ChatMessage as EngineMessage,
)
from engine import (
    FinishReason,
    TokenDelta,
    ToolCall,
    ToolFunction,
)
from engine.logprobs import TokenLogprob
from engine.prompts import MAX_IMAGES
from engine.store.pull import PullEvent
from gateway.auth import Principal
from gateway.conversations import newest_images
from gateway.generation import (
    ToolUse,
    for_vision,
    format_options,
    logprob_json,
    prepare,
    run,
    with_seeds,
)
from gateway.logs import bind
from gateway.models import pull_progress
from gateway.toolcalls import CallArguments, CallStarted, TextPiece, ToolCallReader
from protocol import messages as m
from protocol.durations import parse_duration
from protocol.errors import BadRequest, Cancelled, FerrousError, error_from_code

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = ["GenerationStreams"]

log = logging.getLogger("ferrous.session")


def _logprobs(lps: list[TokenLogprob]) -> list[m.Logprob]:
    return [msgspec.convert(logprob_json(lp), m.Logprob) for lp in lps]


def _engine_message(x: m.ChatMessage) -> EngineMessage:
    calls = None
    if x.tool_calls:
        calls = [ToolCall(c.id, c.name, c.arguments) for c in x.tool_calls]
    return EngineMessage(
        x.role, x.content, tool_calls=calls, tool_call_id=x.tool_call_id, images=x.images
    )


def _tool_use(msg: m.Chat) -> ToolUse | None:
    if not msg.tools:
        if msg.tool_choice == "required" or msg.tool_name is not None:
            raise BadRequest("tool_choice needs tools")
        return None
    tools = [
        ToolFunction(
            t.name, t.description, "" if t.parameters is None else json.dumps(t.parameters)
        )
        for t in msg.tools
    ]
    return ToolUse(tools, msg.tool_choice, msg.tool_name, msg.parallel_tool_calls)


class GenerationStreams:
    """Runs a session's generations; mixed into :class:`gateway.sessions.Session`."""

    # What the session provides.
    gateway: Gateway
    principal: Principal
    owner: tuple[str | None, str]
    id: str
    ended: bool
    _phase: dict[str, str]
    _user_cancelled: set[str]
    _calls_sent: dict[str, int]
    _credits: int | None
    _credit_event: asyncio.Event | None

    async def send(self, msg: m.ServerMessage, *, apart: bool = False) -> None:
        raise NotImplementedError

    async def send_error(
        self, exc: FerrousError, gen_id: str | None = None, *, apart: bool = False
    ) -> None:
        raise NotImplementedError

    def _request_id(self, gen_id: str) -> str:
        raise NotImplementedError

    async def _send_pieces(
        self,
        gen_id: str,
        reader: ToolCallReader,
        pieces: list[TextPiece | CallStarted | CallArguments],
        seq: int,
        parts: list[str],
    ) -> int:
        """Text as ``delta`` (numbered from ``seq``), each call complete as ``tool_call``."""
        for piece in pieces:
            if isinstance(piece, TextPiece):
                await self._take_credit(len(piece.text.encode("utf-8")))
                await self.send(m.Delta(gen_id, seq, piece.text))
                parts.append(piece.text)
                seq += 1
        while len(reader.calls) > self._calls_sent.get(gen_id, 0):
            i = self._calls_sent.get(gen_id, 0)
            call = reader.calls[i]
            self._calls_sent[gen_id] = i + 1
            await self.send(m.ToolCallEvent(gen_id, i, call.id, call.name, call.arguments))
        return seq

    async def _take_credit(self, n: int) -> None:
        if self._credits is None:
            return
        if self._credits <= 0:
            self.gateway.metrics.pauses.inc()
            if self._credit_event is None:
                self._credit_event = asyncio.Event()
            while self._credits is not None and self._credits <= 0:
                self._credit_event.clear()
                await self._credit_event.wait()
        if self._credits is not None:  # None: a resume turned flow control off
            self._credits -= n

    async def _generate(self, msg: m.Generate | m.Chat) -> None:
        g = self.gateway
        t0 = time.perf_counter()
        conv = None
        conv_id = None
        turns: list[EngineMessage] = []
        parts: list[str] = []
        reader: ToolCallReader | None = None
        out_seq = 0  # deltas sent (with tools, text held back while it may open a call)
        with bind(session=self.id, request=msg.id):
            try:
                self._phase[msg.id] = "prep"
                if msg.id in self._user_cancelled:
                    raise asyncio.CancelledError
                keep_alive = None if msg.keep_alive is None else parse_duration(msg.keep_alive)
                common: dict[str, Any] = {
                    "options": msg.options,
                    "extra": format_options(msg.format),
                    "keep_alive": keep_alive,
                    "token_ids": msg.token_ids,
                    "priority": msg.priority,
                    "adapters": msg.adapters,
                    "request_id": self._request_id(msg.id),
                    "started": t0,
                }
                if isinstance(msg, m.Chat):
                    resolved = await g.ensure_model(self.principal, msg.model, keep_alive)
                    conv_id = msg.conversation or "c-" + secrets.token_hex(8)
                    conv = await g.conversations.history(self.owner, conv_id, msg.model)
                    # Images checked and sized once, as they arrive; the conversation
                    # keeps them so later turns can ask about them.
                    turns = await for_vision([_engine_message(x) for x in msg.messages])
                    tools = _tool_use(msg)
                    if tools is not None and msg.format is not None:
                        raise BadRequest("tools cannot be combined with format")
                    if tools is not None and tools.active:
                        reader = ToolCallReader()
                    if not conv.messages:  # a new conversation opens with the Modelfile's seeds
                        turns = with_seeds(resolved, turns)
                    # The turn joins the conversation only when it is answered (below):
                    # until then it is this generation's alone, so an overlapping turn
                    # on the same conversation that fails cannot take it out.
                    prepared = await prepare(
                        g,
                        self.principal,
                        msg.model,
                        messages=newest_images([*conv.messages, *turns], MAX_IMAGES),
                        seed=False,
                        tools=tools,
                        **common,
                    )
                else:
                    prepared = await prepare(
                        g, self.principal, msg.model, prompt=msg.prompt, **common
                    )
                if msg.id in self._user_cancelled:
                    raise asyncio.CancelledError
                self._phase[msg.id] = "engine"
                started = False

                async def on_start() -> None:
                    """The engine admitted it: ``started`` (after any ``queued``)."""
                    nonlocal started
                    if not started:
                        started = True
                        await self.send(m.Started(msg.id, msg.model, conv_id))
                        log.info("generation started on %s", msg.model)

                async def on_wait(position: int, wait_s: float | None) -> None:
                    await self.send(m.Queued(msg.id, position, wait_s))

                async for ev in run(g, prepared, on_wait=on_wait, on_start=on_start):
                    cancelled = msg.id in self._user_cancelled
                    if isinstance(ev, TokenDelta):
                        await on_start()  # once: normally already sent at admission
                        if cancelled:
                            # Text the worker made before the cancel reached it: the
                            # client asked for no more, so none is sent.
                            continue
                        if reader is None:
                            await self._take_credit(len(ev.text.encode("utf-8")))
                            lps = None if ev.logprobs is None else _logprobs(ev.logprobs)
                            await self.send(m.Delta(msg.id, ev.seq, ev.text, ev.token_ids, lps))
                            parts.append(ev.text)
                        else:
                            out_seq = await self._send_pieces(
                                msg.id, reader, reader.feed(ev.text), out_seq, parts
                            )
                        continue
                    if reader is not None and not cancelled:
                        out_seq = await self._send_pieces(
                            msg.id, reader, reader.finish(), out_seq, parts
                        )
                    self._phase[msg.id] = "ending"
                    answered = ev.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
                    calls = reader.calls if reader is not None else []
                    if (
                        conv is not None
                        and conv_id is not None
                        and (answered or (parts and ev.error is None))
                    ):
                        # Committed at once (no await in between): the question and
                        # its answer, or what was said of it before a cancel.
                        said = EngineMessage(
                            "assistant",
                            "".join(parts),
                            tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in calls] or None,
                        )
                        g.conversations.append(self.owner, conv_id, [*turns, said])
                    if ev.error is not None:
                        err = error_from_code(
                            ev.error.code, ev.error.message, retryable=ev.error.retryable
                        )
                        await self.send_error(err, msg.id)
                    t = ev.timings
                    log.info(
                        "generation ended: %s, %d prompt + %d completion tokens, first token %.1f ms",
                        ev.finish_reason.value,
                        ev.usage.prompt_tokens,
                        ev.usage.completion_tokens,
                        t.ttft_ms,
                    )
                    reason = ev.finish_reason
                    if cancelled and reason is not FinishReason.ERROR:
                        # It ended on its own while the cancel was on its way: the
                        # client stopped reading at its cancel, so it was cancelled.
                        reason = FinishReason.CANCELLED
                    finish = reason.value
                    if calls and reason is FinishReason.STOP:
                        finish = "tool_calls"
                    await self.send(
                        m.Done(
                            msg.id,
                            finish,
                            m.Usage(
                                ev.usage.prompt_tokens,
                                ev.usage.completion_tokens,
                                ev.usage.cached_tokens,
                            ),
                            m.Timings(t.load_ms, t.queue_ms, t.ttft_ms, t.total_ms, t.decode_tok_s),
                            conv_id,
                        )
                    )
            except FerrousError as exc:
                log.info("generation refused: %s: %s", exc.code.value, exc.message)
                await self.send_error(exc, msg.id)
            except asyncio.CancelledError:
                ending = self._phase.get(msg.id) == "ending"
                if msg.id in self._user_cancelled and not self.ended and not ending:
                    with contextlib.suppress(Exception):
                        await self.send(
                            m.Done(
                                msg.id,
                                FinishReason.CANCELLED.value,
                                m.Usage(0, 0),
                                m.Timings(0.0, 0.0, 0.0, (time.perf_counter() - t0) * 1000, 0.0),
                                conv_id,
                            )
                        )
                raise
            finally:
                self._user_cancelled.discard(msg.id)

    async def _pull(self, msg: m.Pull) -> None:
        """Pull a model into the store, streaming progress messages (latest state wins)."""
        self._phase[msg.id] = "prep"
        with bind(session=self.id, request=msg.id):
            view = self.gateway.models_for(self.principal)
            stream = pull_progress(view.pull_starter(msg.model, msg.source, msg.sha256))
            try:
                if msg.id in self._user_cancelled:
                    # A cancel read before this task started ("queued"): like _generate, honour
                    # it here, or the pull would run to the end and the cancel be lost.
                    raise asyncio.CancelledError
                async for item in stream:
                    if isinstance(item, PullEvent):
                        await self.send(
                            m.Progress(msg.id, item.status, item.digest, item.total, item.completed)
                        )
                    else:
                        await self.send(m.Progress(msg.id, "success", None, item.size, item.size))
            except FerrousError as exc:
                log.info("pull failed: %s: %s", exc.code.value, exc.message)
                await self.send_error(exc, msg.id)
            except asyncio.CancelledError:
                if msg.id in self._user_cancelled and not self.ended:
                    with contextlib.suppress(Exception):
                        await self.send_error(Cancelled("pull cancelled"), msg.id)
                raise
            finally:
                await stream.aclose()
                self._user_cancelled.discard(msg.id)
