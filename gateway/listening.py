"""A ``listen`` stream of a WebSocket session: audio in, speech events and transcripts out.

Audio arrives in the session's receive loop (:meth:`ListenStream.feed`):
it is brought to 16 kHz, cut into 32 ms windows, and each window's voice
activity decides where utterances start and end (:mod:`gateway.utterances`).
That part is quick (a fraction of a millisecond a window) and runs inline,
so a ``speech`` start reaches the client — and cancels a spoken answer it
interrupts — as soon as the window that makes it arrives.

Recognition runs in the stream's own task (:meth:`ListenStream.run`): while
someone speaks, the utterance so far is transcribed again every
``PARTIAL_EVERY_S`` of new audio (one decode at a time; the words two
decodes in a row agree on are *settled* and never change); when the
utterance ends, any partial decode in flight is dropped and the whole
utterance is decoded once more for its final transcript. Utterances are
bounded (``max_utterance_s``, the recogniser's window); one that reaches the
limit is cut there and the next starts with the audio just before the cut,
the repeated words dropped. Audio waiting for recognition is bounded too
(``MAX_PENDING_S``): beyond it, audio is refused with ``overloaded``.

With ``reply`` set, each final transcript starts a spoken answer
(:class:`gateway.voiceturn.VoiceTurn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import secrets
import time
import wave
from collections import deque
from dataclasses import dataclass

import numpy as np

from engine import TranscribeOptions, Transcript
from gateway.speech import transcribe
from gateway.utterances import (
    WINDOW_MS,
    Endpointer,
    EndpointSettings,
    SettledWords,
    without_overlap,
)
from gateway.vad import RATE, WINDOW, Resampler, VadModel
from gateway.voiceturn import VoiceHost, VoiceTurn
from protocol import messages as m
from protocol.errors import FerrousError, Overloaded

__all__ = ["MAX_PENDING_S", "PARTIAL_EVERY_S", "ListenStream"]

log = logging.getLogger("ferrous.voice")

PARTIAL_EVERY_S = 0.8  # new speech between two partial transcripts
MAX_PENDING_S = 120.0  # audio waiting for recognition before more is refused
_KEEP_TRAILING = 6  # windows of the closing silence kept with an utterance (192 ms)
# Job priorities in the worker: finals before answers' speech before partials.
_FINAL, _PARTIAL = 2, -1


@dataclass
class _Guess:
    """Work started at a pause in speech: the final decode, then the answer, held."""

    utterance: int
    task: asyncio.Task[str]  # the transcript
    turn: VoiceTurn | None = None

    def drop(self) -> None:
        self.task.cancel()
        if self.turn is not None:
            self.turn.drop()


@dataclass
class _Utterance:
    number: int
    audio: np.ndarray
    start: float  # seconds into the stream
    end: float
    after_cut: bool  # the one before it was cut at the length limit
    guess: _Guess | None = None  # the work its last pause started


def wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz float samples as a WAV file (what the recogniser's worker decodes)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())
    return buf.getvalue()


class ListenStream:
    """One ``listen`` stream (see the module)."""

    def __init__(self, host: VoiceHost, msg: m.Listen, vad: VadModel) -> None:
        self.host = host
        self.msg = msg
        self.id = msg.id
        options = msg.vad or m.VadOptions()
        self._settings = EndpointSettings(
            threshold=options.threshold,
            silence_ms=options.silence_ms,
            min_speech_ms=options.min_speech_ms,
            pad_ms=options.pad_ms,
        )
        self._endpointer = Endpointer(self._settings)
        self._resampler = Resampler(msg.rate)
        self._vad = vad.stream()
        back = (self._settings.min_speech_ms + self._settings.pad_ms) // WINDOW_MS + 1
        self._recent: deque[np.ndarray] = deque(maxlen=back)  # windows before speech
        self._current: list[np.ndarray] | None = None  # the utterance's windows
        self._utterance = 0
        self._start = 0.0
        self._decoded = 0  # windows of the current utterance at its last partial decode
        self._settled = SettledWords()
        self._finals: deque[_Utterance] = deque()
        self._partial: asyncio.Task[None] | None = None
        self._guess: _Guess | None = None  # work started at the current pause
        self._partial_s = 0.0  # how long the last partial decode took
        self._wake = asyncio.Event()
        self._no_more = False  # the client sent end
        self._started = False  # "started" was sent: audio is taken as it comes
        self._early: list[tuple[bytes, bool]] = []
        self._early_bytes = 0
        self._last_final = ""
        self._cut = False
        self.conversation = (msg.reply.conversation if msg.reply else None) or (
            "c-" + secrets.token_hex(8)
        )
        self.turn: VoiceTurn | None = None
        self._turns: set[asyncio.Task[None]] = set()
        self.unanswered = ""  # an interrupted turn's question nobody answered yet

    # -- audio in (the session's receive loop) ------------------------------------------

    async def feed(self, pcm: bytes, *, end: bool = False) -> None:
        """Take samples from the client; raises BadRequest or Overloaded for a bad frame.

        Audio that comes before the stream has started (its models are still being
        checked and loaded) waits, so that ``started`` is the stream's first message.
        """
        if not self._started:
            self._early_bytes += len(pcm)
            if self._early_bytes > MAX_PENDING_S * self.msg.rate * 2:
                raise _with_id(Overloaded("too much audio before the stream started"), self.id)
            self._early.append((pcm, end))
            return
        await self._feed(pcm, end=end)

    async def _feed(self, pcm: bytes, *, end: bool) -> None:
        if self._no_more:
            if pcm or not end:
                raise _with_id(Overloaded("this stream's audio has ended"), self.id)
            return
        samples = self._resampler.feed(pcm)
        if self._pending_s() > MAX_PENDING_S:
            raise _with_id(
                Overloaded(
                    f"more than {MAX_PENDING_S:.0f} s of audio wait for recognition: "
                    "send audio no faster than it is spoken"
                ),
                self.id,
            )
        for probability, window in self._vad.feed(samples):
            await self._window(probability, window)
        if end:
            self._no_more = True
            if self._current is not None:  # speech still going: it ends with the audio
                await self._close_utterance(trailing=0)
        if end or self._partial_due():
            self._wake.set()

    def _partial_due(self) -> bool:
        """Enough new speech for another partial transcript: ``PARTIAL_EVERY_S``, or three
        times what the last one took when the recogniser is busy (partials yield to load)."""
        new = len(self._current) - self._decoded if self._current is not None else 0
        every = max(PARTIAL_EVERY_S, 3 * self._partial_s)
        return self.msg.partials and new * WINDOW_MS >= every * 1000

    def _pending_s(self) -> float:
        queued = sum(len(u.audio) for u in self._finals) / RATE
        return queued + (len(self._current) * WINDOW / RATE if self._current else 0.0)

    async def _window(self, probability: float, window: np.ndarray) -> None:
        edge = self._endpointer.feed(probability)
        if self._current is not None:
            self._current.append(window)
        else:
            self._recent.append(window)
        if edge == "start":
            back = self._endpointer.window - self._endpointer.start_window()
            self._current = list(self._recent)[-back:]
            self._recent.clear()
            self._utterance += 1
            self._decoded = 0
            self._settled = SettledWords()
            self._start = (self._endpointer.window - len(self._current)) * WINDOW / RATE
            if self.turn is not None and self.msg.reply is not None and self.msg.reply.barge_in:
                self.turn.interrupt()  # before anything is awaited: the answer stops now
            await self.host.send(m.SpeechEdge(self.id, self._utterance, "start", self._start))
        elif edge == "end":
            await self._close_utterance(trailing=self._endpointer.trailing())
        elif edge == "pause" and self._current is not None and not self._cut:
            # The audio and the settled words as they are now: the task runs later.
            audio = np.concatenate(self._current)
            settled = SettledWords(list(self._settled.settled))
            task = asyncio.create_task(self._speculate(audio, settled))
            task.add_done_callback(_retrieve)  # a dropped guess's failure is nobody's
            self._guess = _Guess(self._utterance, task)
        elif edge == "resume" and self._guess is not None:
            self._guess.drop()  # the speaker went on: that transcript is void
            self._guess = None

    async def _speculate(self, audio: np.ndarray, settled: SettledWords) -> str:
        """At a pause: the utterance's final transcript, and its answer started but held,
        so that if this silence is the end, both are (nearly) ready when it is confirmed.
        A pause that is not the end costs the work, never a visible message."""
        text = await self._decode(audio, final=True)
        final = settled.final(text)
        reply = self.msg.reply
        guess = self._guess
        if reply is not None and final and guess is not None and self.turn is None:
            question = f"{self.unanswered} {final}".strip()
            guess.turn = self._turn(f"{self.id}.{guess.utterance}", question, held=True)
        return text

    async def _close_utterance(self, trailing: int) -> None:
        assert self._current is not None
        keep = len(self._current) - max(0, trailing - _KEEP_TRAILING)
        audio = np.concatenate(self._current[:keep]) if keep > 0 else np.zeros(0, np.float32)
        end = self._start + len(audio) / RATE
        guess, self._guess = self._guess, None
        u = _Utterance(self._utterance, audio, self._start, end, self._cut, guess)
        self._finals.append(u)
        self._cut = self._endpointer.cut
        if self._cut:  # the next utterance goes on from the audio just before the cut
            self._recent.extend(
                self._current[-self._recent.maxlen :] if self._recent.maxlen else []
            )
        self._current = None
        if self._partial is not None:
            self._partial.cancel()  # the final decode replaces it
        await self.host.send(m.SpeechEdge(self.id, self._utterance, "end", end))
        self._wake.set()

    # -- recognition (the stream's task) ---------------------------------------------------

    async def run(self) -> None:
        """Transcribe utterances as they come, until the audio ends (then ``done``)."""
        host, t0 = self.host, time.perf_counter()
        reason = "stop"
        try:
            # The models are checked (and loaded) before the stream says it started.
            await host.gateway.ensure_model(host.principal, self.msg.model)
            if self.msg.reply is not None:
                await host.gateway.ensure_model(host.principal, self.msg.reply.model)
                await host.gateway.ensure_model(host.principal, self.msg.reply.voice)
        except FerrousError as exc:
            await host.send_error(exc, self.id)
            return
        await host.send(m.Started(self.id, self.msg.model))
        while self._early:  # what came while the models were checked, in order
            pcm, end = self._early.pop(0)
            try:
                await self._feed(pcm, end=end)
            except FerrousError as exc:
                await host.send_error(exc, self.id, apart=True)
        self._started = True
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._finals:
                    await self._final(self._finals.popleft())
                if self._no_more and self._current is None:
                    break
                if self._partial is None and self._partial_due():
                    assert self._current is not None
                    self._decoded = len(self._current)
                    audio = np.concatenate(self._current)
                    self._partial = asyncio.create_task(self._partial_decode(audio))
                    self._partial.add_done_callback(self._partial_done)
            for task in list(self._turns):  # the last answer ends before the stream does
                await asyncio.shield(task)
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            await self._stop()
            with contextlib.suppress(Exception):
                await host.send(
                    m.Done(
                        self.id,
                        reason,
                        m.Usage(0, 0),
                        m.Timings(0.0, 0.0, 0.0, (time.perf_counter() - t0) * 1000, 0.0),
                    )
                )

    async def _stop(self) -> None:
        for guess in [*(u.guess for u in self._finals), self._guess]:
            if guess is not None:
                guess.drop()
        tasks = list(self._turns)
        if self._partial is not None:
            tasks.append(self._partial)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _partial_done(self, task: asyncio.Task[None]) -> None:
        if self._partial is task:
            self._partial = None
        if self._current is not None:
            self._wake.set()  # more audio may have come meanwhile

    async def _decode(self, audio: np.ndarray, prompt: str | None = None, *, final: bool) -> str:
        """The clip's text. A final decode goes before partial ones queued in the worker."""
        options = TranscribeOptions(language=self.msg.language, prompt=prompt or None, live=True)
        events = transcribe(
            self.host.gateway,
            self.host.principal,
            self.msg.model,
            wav_bytes(audio),
            options,
            priority=_FINAL if final else _PARTIAL,
        )
        async with contextlib.aclosing(events):
            async for item in events:
                if isinstance(item, Transcript):
                    return item.text.strip()
        return ""

    async def _partial_decode(self, audio: np.ndarray) -> None:
        utterance = self._utterance
        t0 = time.perf_counter()
        try:
            text = await self._decode(audio, final=False)
            self._partial_s = time.perf_counter() - t0
        except FerrousError as exc:
            await self.host.send_error(exc, self.id)
            return
        if utterance != self._utterance or self._current is None or not text:
            return  # that utterance ended meanwhile: its final transcript says it all
        if self._guess is not None:
            return  # older than the pause's decode, which the final transcript will be
        settled, whole = self._settled.update(text)
        end = self._start + len(audio) / RATE
        await self.host.send(
            m.TranscriptEvent(
                self.id, utterance, whole, settled=settled, start=self._start, end=end
            )
        )

    async def _final(self, u: _Utterance) -> None:
        settled = self._settled if u.number == self._utterance else SettledWords()
        guess = u.guess
        try:
            if guess is not None:  # decoded at the pause: the audio since is silence
                text = await guess.task
            else:
                prompt = self._last_final[-200:] if u.after_cut else None
                text = await self._decode(u.audio, prompt, final=True)
        except FerrousError as exc:
            if guess is not None:
                guess.drop()
            await self.host.send_error(exc, self.id)
            return
        final = settled.final(text)
        if u.after_cut:
            final = without_overlap(self._last_final, final)
        self._last_final = final
        await self.host.send(
            m.TranscriptEvent(self.id, u.number, final, final=True, start=u.start, end=u.end)
        )
        if self.msg.reply is None or not final:
            return
        held = guess.turn if guess is not None else None
        if held is not None and held.question == f"{self.unanswered} {final}".strip():
            self.unanswered = ""
            self._adopt(held)
            held.release()
        else:
            if held is not None:
                held.drop()
            await self._answer(u.number, final)

    def _turn(self, gen_id: str, question: str, *, held: bool = False) -> VoiceTurn:
        assert self.msg.reply is not None

        def unanswered(question: str) -> None:
            self.unanswered = question

        return VoiceTurn(
            self.host,
            gen_id,
            question,
            self.msg.reply,
            conversation=self.conversation,
            unanswered=unanswered,
            held=held,
        )

    async def _answer(self, utterance: int, text: str) -> None:
        reply = self.msg.reply
        assert reply is not None
        if self.turn is not None and not reply.barge_in:
            await asyncio.shield(self.turn.task)  # answers take turns
        question = f"{self.unanswered} {text}".strip()
        self.unanswered = ""
        self._adopt(self._turn(f"{self.id}.{utterance}", question))

    def _adopt(self, turn: VoiceTurn) -> None:
        """``turn`` is the answer now: barge-in and the stream's end apply to it."""
        self.turn = turn
        self._turns.add(turn.task)

        def gone(task: asyncio.Task[None]) -> None:
            self._turns.discard(task)
            if self.turn is turn:
                self.turn = None

        turn.task.add_done_callback(gone)

    def interrupt_turn(self, gen_id: str) -> bool:
        """Cancel answer ``gen_id`` if it is this stream's (a client's ``cancel``)."""
        if self.turn is not None and self.turn.id == gen_id:
            self.turn.interrupt()
            return True
        return False


def _retrieve(task: asyncio.Task[str]) -> None:
    if not task.cancelled():
        task.exception()


def _with_id(exc: FerrousError, gen_id: str) -> FerrousError:
    exc.gen_id = gen_id  # type: ignore[attr-defined]
    return exc
