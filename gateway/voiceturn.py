"""One spoken answer of a voice conversation: a chat turn whose text is also spoken.

The finished utterance becomes a user turn of the listen stream's
conversation; the answer streams as ``delta`` text while each sentence, once
complete (:class:`gateway.sentences.Sentences`), is synthesised and sent as
``audio`` chunks — so the first sentence is heard while the rest is still
being written. Text generation and speech run side by side: a sentence
queue joins them, and the answer's ``done`` follows its last audio.

Barge-in: :meth:`VoiceTurn.interrupt` (speech starting, or a client's
``cancel``) cancels both at once: closing the generation's and the
synthesis's iterators stops their work in the engine. The conversation
then keeps the question and the sentences whose audio was sent — what the
user heard — and ``done`` says ``cancelled``. A question whose answer was
cut before any of it was spoken is asked again with the next utterance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

from engine import ChatMessage, FinishReason, SpeechChunk, SpeechOptions, TokenDelta
from engine.audio import AudioEncoder
from gateway.generation import prepare, run
from gateway.sentences import Sentences
from gateway.speech import synthesize
from protocol import messages as m
from protocol.errors import FerrousError, error_from_code

if TYPE_CHECKING:
    from gateway.auth import Principal
    from gateway.interface import Gateway

__all__ = ["VoiceHost", "VoiceTurn", "speak"]

log = logging.getLogger("ferrous.voice")

DEFAULT_MAX_TOKENS = 256  # a spoken answer longer than this is a lecture
FIRST_SPEECH_PRIORITY = 3  # an answer's first sentence: the end of a waiting turn, and short


class VoiceHost(Protocol):
    """What voice streams and their answers use of their session."""

    gateway: Gateway
    principal: Principal
    owner: tuple[str | None, str]
    closed: bool  # the connection is gone (the session may live on)
    _user_cancelled: set[str]  # ids the client cancelled (not the session ending)

    async def send(self, msg: m.ServerMessage, *, apart: bool = False) -> None: ...

    async def send_error(
        self, exc: FerrousError, gen_id: str | None = None, *, apart: bool = False
    ) -> None: ...

    async def _take_credit(self, n: int) -> None: ...

    def _request_id(self, gen_id: str) -> str: ...


class VoiceTurn:
    """One answer (see the module); its task starts at once.

    ``conversation``: the id of the conversation it joins; ``unanswered`` is told
    the question when the answer is interrupted before any of it was said.
    """

    def __init__(
        self,
        host: VoiceHost,
        gen_id: str,
        question: str,
        reply: m.Reply,
        *,
        conversation: str,
        unanswered: Callable[[str], None],
        held: bool = False,
    ) -> None:
        self.host = host
        self.conversation = conversation
        self._unanswered = unanswered
        self.id = gen_id
        self.question = question
        self.reply = reply
        self.interrupted = False
        self.text: list[str] = []  # the answer's text as generated
        self.spoken: list[str] = []  # sentences whose audio began to be sent
        # A held answer (speculative: started while the speaker may not be done) keeps
        # what it would send until :meth:`release`, or leaves no trace on :meth:`drop`.
        self._held: list[Callable[[], Awaitable[None]]] | None = [] if held else None
        self._released = asyncio.Event()
        self._out_lock = asyncio.Lock()
        self.dropped = False
        self.task = asyncio.create_task(self._run(), name=f"voice-{gen_id}")
        if not held:
            self._released.set()

    async def _out(self, msg: m.ServerMessage, credit: int = 0) -> None:
        """Send ``msg`` (``credit`` bytes of flow control), or keep it while held."""
        host = self.host

        async def go() -> None:
            if credit:
                await host._take_credit(credit)
            await host.send(msg)
            if isinstance(msg, m.AudioOut) and msg.text is not None:
                # Its audio has begun to reach the listener: the conversation keeps it.
                self.spoken.append(msg.text)

        async with self._out_lock:
            if self._held is not None:
                self._held.append(go)
            else:
                await go()

    async def _out_error(self, exc: FerrousError) -> None:
        async with self._out_lock:
            if self._held is not None:
                self._held.append(lambda: self.host.send_error(exc, self.id))
            else:
                await self.host.send_error(exc, self.id)

    def release(self) -> None:
        """The speaker was done after all: what the answer has made goes out (from the
        answer's own task, so that a barge-in stops that too), then the rest."""
        self._released.set()

    async def _flush_when_released(self) -> None:
        await self._released.wait()
        async with self._out_lock:
            while self._held:
                await self._held.pop(0)()
            self._held = None

    def drop(self) -> None:
        """The speaker went on: the speculative answer ends without a trace."""
        self.dropped = True
        if not self.task.done():
            self.task.cancel()

    def interrupt(self) -> None:
        """Stop generating and speaking now (barge-in)."""
        if not self.task.done():
            self.interrupted = True
            self.task.cancel()

    async def _run(self) -> None:
        host, g, reply = self.host, self.host.gateway, self.reply
        t0 = time.perf_counter()
        conv = await g.conversations.history(host.owner, self.conversation, reply.model)
        turns = []
        if not conv.messages and reply.instructions:
            turns.append(ChatMessage("system", reply.instructions))
        turns.append(ChatMessage("user", self.question))
        options = reply.options or m.Options()
        if options.max_tokens is None:
            options = msgspec.structs.replace(options, max_tokens=DEFAULT_MAX_TOKENS)
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(sentences), name=f"voice-speak-{self.id}")
        flusher = asyncio.create_task(self._flush_when_released(), name=f"voice-flush-{self.id}")
        done: m.Done | None = None
        try:
            prepared = await prepare(
                g,
                host.principal,
                reply.model,
                messages=[*conv.messages, *turns],
                options=options,
                request_id=host._request_id(self.id),
                started=t0,
                priority=reply.priority,
            )
            await self._out(m.Started(self.id, reply.model, self.conversation))
            cutter = Sentences()
            seq = 0
            async for ev in run(g, prepared):
                if isinstance(ev, TokenDelta):
                    await self._out(m.Delta(self.id, seq, ev.text), len(ev.text.encode("utf-8")))
                    seq += 1
                    self.text.append(ev.text)
                    for piece in cutter.feed(ev.text):
                        sentences.put_nowait(piece)
                    continue
                for piece in cutter.flush():
                    sentences.put_nowait(piece)
                sentences.put_nowait(None)
                if ev.error is not None:
                    await self._out_error(error_from_code(ev.error.code, ev.error.message))
                await speaker  # the answer is over when its last sentence was sent
                await flusher  # a held answer counts once it is released and sent
                t = ev.timings
                reason = ev.finish_reason
                done = m.Done(
                    self.id,
                    reason.value,
                    m.Usage(
                        ev.usage.prompt_tokens, ev.usage.completion_tokens, ev.usage.cached_tokens
                    ),
                    m.Timings(
                        t.load_ms,
                        t.queue_ms,
                        t.ttft_ms,
                        (time.perf_counter() - t0) * 1000,
                        t.decode_tok_s,
                    ),
                    self.conversation,
                )
                if reason in (FinishReason.STOP, FinishReason.LENGTH):
                    said = ChatMessage("assistant", "".join(self.text))
                    g.conversations.append(host.owner, self.conversation, [*turns, said])
        except FerrousError as exc:
            await self._out_error(exc)
        except asyncio.CancelledError:
            if self.dropped or not self._released.is_set():
                raise  # never shown: nothing to end, nothing to keep
            self._keep_what_was_said(turns)
            with contextlib.suppress(Exception):
                await host.send(_done(self.id, FinishReason.CANCELLED.value, t0, self.conversation))
            raise
        finally:
            speaker.cancel()
            flusher.cancel()
            await asyncio.gather(speaker, flusher, return_exceptions=True)
        if done is not None:
            await self._out(done)

    def _keep_what_was_said(self, turns: list[ChatMessage]) -> None:
        """An interrupted answer: the conversation keeps what the user heard of it."""
        if self.spoken:
            said = ChatMessage("assistant", " ".join(self.spoken))
            self.host.gateway.conversations.append(
                self.host.owner, self.conversation, [*turns, said]
            )
        else:
            self._unanswered(self.question)
        log.info("answer %s interrupted after %d sentences spoken", self.id, len(self.spoken))

    async def _speak(self, sentences: asyncio.Queue[str | None]) -> None:
        """Each sentence synthesised and sent as it comes, in order."""
        host, reply = self.host, self.reply
        encoder: AudioEncoder | None = None
        seq = 0
        rate = 0
        while (sentence := await sentences.get()) is not None:
            first = True
            events = synthesize(
                host.gateway,
                host.principal,
                reply.voice,
                sentence,
                SpeechOptions(speed=reply.speed),
                # The first sentence is awaited; later ones have the time the earlier
                # ones take to play.
                priority=FIRST_SPEECH_PRIORITY if seq == 0 else 0,
            )
            async with contextlib.aclosing(events):
                async for item in events:
                    if not isinstance(item, SpeechChunk):
                        continue
                    rate = item.rate
                    data = item.pcm
                    if reply.format != "pcm16":
                        if encoder is None:
                            encoder = AudioEncoder(reply.format, rate)
                        data = encoder.encode(data)
                    if not data:
                        continue
                    text = sentence if first else None
                    await self._out(
                        m.AudioOut(self.id, seq, data, rate, reply.format, text), len(data)
                    )
                    seq += 1
                    first = False
        if encoder is not None:
            tail = encoder.close()
            if tail:
                await self._out(m.AudioOut(self.id, seq, tail, rate, reply.format), len(tail))


async def speak(host: VoiceHost, msg: m.Speak) -> None:
    """A ``speak`` request: ``started``, its audio a sentence at a time, ``done``."""
    t0 = time.perf_counter()
    seconds = 0.0
    await host.send(m.Started(msg.id, msg.model))
    try:
        encoder: AudioEncoder | None = None
        seq, rate = 0, 0
        options = SpeechOptions(speed=msg.speed, seed=msg.seed)
        events = synthesize(host.gateway, host.principal, msg.model, msg.text, options)
        async with contextlib.aclosing(events):
            async for item in events:
                if not isinstance(item, SpeechChunk):
                    seconds = item.seconds
                    continue
                rate, data = item.rate, item.pcm
                if msg.format != "pcm16":
                    encoder = encoder or AudioEncoder(msg.format, rate)
                    data = encoder.encode(data)
                if data:
                    await host._take_credit(len(data))
                    await host.send(m.AudioOut(msg.id, seq, data, rate, msg.format))
                    seq += 1
        if encoder is not None and (tail := encoder.close()):
            await host._take_credit(len(tail))
            await host.send(m.AudioOut(msg.id, seq, tail, rate, msg.format))
    except FerrousError as exc:
        await host.send_error(exc, msg.id)
        return
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await host.send(_done(msg.id, FinishReason.CANCELLED.value, t0))
        raise
    log.info("spoke %.2f s of audio", seconds)
    await host.send(_done(msg.id, FinishReason.STOP.value, t0))


def _done(gen_id: str, reason: str, t0: float, conversation: str | None = None) -> m.Done:
    total = (time.perf_counter() - t0) * 1000
    return m.Done(gen_id, reason, m.Usage(0, 0), m.Timings(0.0, 0.0, 0.0, total, 0.0), conversation)
