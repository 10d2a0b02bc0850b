"""Requests that are jobs in a worker (engine.jobs): embeddings, transcriptions, speech.

:class:`JobCalls` is the part of :class:`engine.EngineClient` that sends
them: a job goes to the least busy live worker holding its model (no slots,
no fair queue: jobs run one unit at a time between decode steps), holds the
model in memory while it runs, and answers with one frame (embeddings) or a
stream of frames (a transcription's segments as they are decoded).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import AsyncGenerator, Sequence

import msgspec

from engine import ipc
from engine.pool import Worker, WorkerPool
from engine.requests import (
    Classification,
    Embeddings,
    ImageOptions,
    Images,
    ImageStep,
    Speech,
    SpeechChunk,
    SpeechOptions,
    TranscribeOptions,
    Transcript,
    TranscriptSegment,
)
from engine.residency import Residency
from engine.settings import EngineConfig
from protocol.errors import BadRequest, EngineError, ModelNotFound, TooLarge, error_from_code

__all__ = ["EMBED_TIMEOUT_S", "JOB_IDLE_S", "MAX_AUDIO_BYTES", "JobCalls"]

# An embedding call is answered in one frame after all its inputs are read; a
# large batch of long inputs on a small CPU can take minutes.
EMBED_TIMEOUT_S = 600.0
JOB_IDLE_S = 600.0  # the longest a speech job may go without a frame (one window)
MAX_AUDIO_BYTES = 32 * 1024 * 1024  # one upload; a frame to the worker holds it whole


class JobCalls:
    """Sending jobs to workers (mixed into EngineClient, which sets these up)."""

    config: EngineConfig
    _pool: WorkerPool
    _residency: Residency
    _changed: asyncio.Condition | None

    async def _pick(self, model: str) -> Worker:
        """The least busy live worker with ``model``; waits for a replacement worker."""
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout
        while True:
            candidates = (
                [w for w in self._pool.workers if w.alive and model in w.models]
                if model in self._residency.models
                else []
            )
            if candidates:
                return min(candidates, key=lambda w: len(w.gens))
            if model not in self._residency.models:
                raise ModelNotFound(f"model {model!r} is not loaded")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EngineError(f"no worker has model {model!r} ready", retryable=True)
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def embed(
        self,
        model: str,
        inputs: list[str],
        *,
        truncate: bool = True,
        keep_alive: float | None = None,
        images: Sequence[bytes] = (),
    ) -> Embeddings:
        """Embedding vectors of ``inputs`` (unit length, in input order) from one worker.

        The least busy live worker that has ``model`` computes them between its
        decode steps. ``truncate=False`` refuses an input longer than the
        embedding context (BadRequest) instead of cutting it. ``images`` (encoded
        files, for an image and text embedding model) are embedded after the
        texts, their vectors following the texts'. ``keep_alive``
        means what it means for :class:`GenerateRequest`. Raises ModelNotFound,
        BadRequest (no inputs, an empty input, a backend without embeddings) or
        EngineError (the worker died; retryable).
        """
        if not inputs and not images:
            raise BadRequest("no inputs to embed")
        req = self._pool.next_req()
        msg = ipc.Embed(
            req=req, model=model, inputs=list(inputs), truncate=truncate, images=list(images)
        )
        # A frame the worker cannot read would end its connection: refuse it here.
        if sum(map(len, inputs)) * 4 + 16 * len(inputs) + sum(map(len, images)) > ipc.MAX_FRAME:
            size = len(ipc.encode(msg))
            if size > ipc.MAX_FRAME:
                raise TooLarge(f"the inputs take {size} bytes; one request takes {ipc.MAX_FRAME}")
        reply = await self._job_reply(model, msg, req, keep_alive)
        assert isinstance(reply, ipc.Embedded)
        floats = array("f")
        floats.frombytes(reply.data)
        flat = floats.tolist()
        dim = reply.dim
        vectors = [flat[i : i + dim] for i in range(0, len(flat), dim)] if dim else []
        return Embeddings(vectors, reply.prompt_tokens, model)

    async def classify(
        self,
        model: str,
        images: list[bytes],
        *,
        top_k: int = 5,
        keep_alive: float | None = None,
    ) -> Classification:
        """Each image's ``top_k`` labels with probabilities, likeliest first, in input order.

        ``images`` are encoded files (PNG, JPEG, WebP, GIF, BMP). Raises
        ModelNotFound, BadRequest (not an image classifier, no images, an image
        that cannot be read, named by its index), TooLarge (an image over the
        byte or pixel limit, or more bytes than one request takes) or
        EngineError (the worker died; retryable).
        """
        if not images:
            raise BadRequest("no images to classify")
        if sum(map(len, images)) + 64 * len(images) > ipc.MAX_FRAME - 1024:
            raise TooLarge(f"the images take more than the {ipc.MAX_FRAME} bytes one request takes")
        req = self._pool.next_req()
        msg = ipc.Classify(req=req, model=model, images=list(images), top_k=top_k)
        reply = await self._job_reply(model, msg, req, keep_alive)
        assert isinstance(reply, ipc.Classified)
        return Classification(reply.labels, model)

    async def transcribe_stream(
        self,
        model: str,
        audio: bytes,
        options: TranscribeOptions | None = None,
        *,
        keep_alive: float | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[TranscriptSegment | Transcript, None]:
        """Each segment of ``audio``'s transcript as it is decoded, then the whole :class:`Transcript`.

        ``audio`` is a file's bytes in any common format (wav, mp3, ogg/opus,
        m4a, webm, flac). Raises ModelNotFound, BadRequest (not a speech model,
        options it cannot honour, audio that cannot be decoded), TooLarge (an
        upload over ``MAX_AUDIO_BYTES`` or audio over the length limit) or
        EngineError (the worker died; retryable). Closing the iterator early
        stops the work in the worker. A worker runs jobs of a higher ``priority`` first.
        """
        if len(audio) > MAX_AUDIO_BYTES:
            raise TooLarge(
                f"the audio takes {len(audio)} bytes; one request takes {MAX_AUDIO_BYTES}"
            )
        req = self._pool.next_req()
        msg = ipc.Transcribe(
            req=req,
            model=model,
            audio=audio,
            options=options or TranscribeOptions(),
            priority=priority,
        )
        segments: list[TranscriptSegment] = []
        frames = self._job_frames(model, msg, req, ipc.Transcribed, keep_alive)
        async with contextlib.aclosing(frames):  # closed at once when our caller stops
            async for frame in frames:
                if isinstance(frame, ipc.TranscriptPart):
                    for segment in frame.segments:
                        segments.append(segment)
                        yield segment
                elif isinstance(frame, ipc.Transcribed):
                    text = "".join(s.text for s in segments).strip()
                    yield Transcript(
                        text=text,
                        language=frame.language,
                        duration=frame.duration,
                        segments=segments,
                        model=model,
                    )

    async def transcribe(
        self,
        model: str,
        audio: bytes,
        options: TranscribeOptions | None = None,
        *,
        keep_alive: float | None = None,
    ) -> Transcript:
        """The whole transcript of ``audio`` (see :meth:`transcribe_stream`)."""
        async for item in self.transcribe_stream(model, audio, options, keep_alive=keep_alive):
            if isinstance(item, Transcript):
                return item
        raise EngineError("the transcription ended without its result")

    async def synthesize_stream(
        self,
        model: str,
        text: str,
        options: SpeechOptions | None = None,
        *,
        keep_alive: float | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[SpeechChunk | Speech, None]:
        """``text`` spoken by ``model``: a :class:`SpeechChunk` a sentence, then :class:`Speech`.

        Raises ModelNotFound, BadRequest (not a speech synthesis model, an empty
        input, a speed it cannot honour), TooLarge (an input over its limit) or
        EngineError (the worker died; retryable). Closing the iterator early
        stops the work in the worker.
        """
        req = self._pool.next_req()
        msg = ipc.Synthesize(
            req=req, model=model, text=text, options=options or SpeechOptions(), priority=priority
        )
        frames = self._job_frames(model, msg, req, ipc.Synthesized, keep_alive)
        async with contextlib.aclosing(frames):  # closed at once when our caller stops
            async for frame in frames:
                if isinstance(frame, ipc.AudioPart):
                    yield SpeechChunk(frame.pcm, frame.rate)
                elif isinstance(frame, ipc.Synthesized):
                    yield Speech(seconds=frame.seconds, sample_rate=frame.sample_rate, model=model)

    async def generate_images_stream(
        self,
        model: str,
        prompt: str,
        options: ImageOptions | None = None,
        *,
        keep_alive: float | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[ImageStep | Images, None]:
        """Images for ``prompt`` from ``model``: an :class:`ImageStep` per sampler step, then
        :class:`Images` (PNG files and the seed that makes them again).

        Raises ModelNotFound, BadRequest (not an image generation model; a size, a
        number of images or of steps it does not take; a prompt a class-conditioned
        model cannot read) or EngineError (the worker died; retryable). Closing the
        iterator early stops the work in the worker.
        """
        req = self._pool.next_req()
        msg = ipc.MakeImages(
            req=req,
            model=model,
            prompt=prompt,
            options=options or ImageOptions(),
            priority=priority,
        )
        frames = self._job_frames(model, msg, req, ipc.ImagesMade, keep_alive)
        async with contextlib.aclosing(frames):  # closed at once when our caller stops
            async for frame in frames:
                if isinstance(frame, ipc.ImagesStep):
                    yield ImageStep(frame.step, frame.steps)
                elif isinstance(frame, ipc.ImagesMade):
                    yield Images(images=frame.images, seed=frame.seed, model=model)

    async def _job_reply(
        self, model: str, msg: ipc.ToWorker, req: int, keep_alive: float | None
    ) -> ipc.FromWorker:
        """The one reply of a job on the least busy worker holding ``model``, the model held
        in memory meanwhile; a WorkerError raised as its error."""
        worker = await self._pick(model)
        spec = self._residency.models[model]
        spec.active += 1
        spec.last_used = time.monotonic()
        try:
            reply = await self._pool.request(worker, msg, req, EMBED_TIMEOUT_S)
        finally:
            self._residency.release(spec, keep_alive)
        if isinstance(reply, ipc.WorkerError):
            raise error_from_code(reply.code, reply.message, retryable=reply.retryable)
        return reply

    async def _job_frames(
        self,
        model: str,
        msg: ipc.ToWorker,
        req: int,
        last: type[msgspec.Struct],
        keep_alive: float | None,
    ) -> AsyncGenerator[ipc.FromWorker, None]:
        """The frames of a streaming job on the least busy worker holding ``model``, to the
        ``last`` one; the model held in memory meanwhile, a WorkerError raised as its error."""
        worker = await self._pick(model)
        spec = self._residency.models[model]
        spec.active += 1
        spec.last_used = time.monotonic()
        try:
            async for frame in self._pool.stream(
                worker, msg, req, last=(last,), idle_timeout=JOB_IDLE_S
            ):
                if isinstance(frame, ipc.WorkerError):
                    raise error_from_code(frame.code, frame.message, retryable=frame.retryable)
                yield frame
        finally:
            self._residency.release(spec, keep_alive)
