"""Video analysis: a clip's frames classified or embedded and its soundtrack transcribed.

This module is the analysis (:func:`analyze`, a stream of events) and its
request; :mod:`gateway.video_routes` serves it and :mod:`gateway.videojobs`
keeps it running past a disconnect.

``POST /v1/video/analyze`` takes a multipart form: ``file`` (the video: mp4,
webm, mkv, mov, ... up to :data:`MAX_VIDEO_BYTES` and :data:`MAX_VIDEO_SECONDS`),
``model`` (an image model), ``task`` (``classify``, the default, or
``embed``), ``every`` (seconds between sampled frames, 1 by default, at least
0.1), ``top_k`` (3), ``asr_model`` (a speech recognition model for the
soundtrack), ``stream`` and ``detach`` (:mod:`gateway.video_routes`). The answer::

    {"duration": 60.0, "model": "open-nsfw",
     "frames": [{"t": 0.0, "labels": [{"label": "sfw", "score": 0.98}, ...]}, ...],
     "transcript": {"text": "...", "segments": [{"start": 0.0, "end": 2.1, "text": "..."}]},
     "notices": []}

Frames are decoded and scaled in the gateway's video threads (two, shared by
every analysis, so videos never take the threads other work needs), eight at
a time (:mod:`engine.video`), and go to the model's worker as JPEGs; the soundtrack
is taken out as Opus and transcribed by the speech model's worker. With a
soundtrack and no ``asr_model`` the answer says which model to name in
``notices``. With ``stream=true`` the same comes as server-sent events while
it is computed: ``progress`` (``stage`` ``transcript`` or ``frames``,
``done`` of ``total``), ``segment``, ``frame``, ``notice`` and a last ``done``
with the duration. Cancelling the analysis stops its decoding between batches
and its jobs in the workers; the analysis ends only once its thread has
(within a frame), so a cancelled job's place is not reused while it still decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from engine import Label, TranscribeOptions, Transcript, TranscriptSegment
from engine.video import VideoInfo, probe, sample_frames, soundtrack
from gateway.auth import Principal
from gateway.forms import form_text
from gateway.generation import embed
from gateway.image_routes import classify
from gateway.interface import Gateway
from gateway.openai_wire import InvalidParam
from gateway.speech import transcribe
from protocol.errors import BadRequest

__all__ = [
    "MAX_VIDEO_BYTES",
    "MAX_VIDEO_SECONDS",
    "VideoEvent",
    "VideoRequest",
    "analyze",
    "event_of",
    "frame_json",
    "request_of",
    "segment_json",
]

MAX_VIDEO_BYTES = 128 * 1024 * 1024
MAX_VIDEO_SECONDS = 1800.0  # half an hour; its soundtrack fits one speech job
MAX_FRAMES = 3600  # frames one request samples
_BATCH = 8
_THREADS = 2

T = TypeVar("T")
_executor: ThreadPoolExecutor | None = None


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a video thread. A cancel is passed on only once the
    thread has finished (the work is bounded, and the caller's stop flag shortens
    it): a job counted as ended must not still be decoding."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(_THREADS, thread_name_prefix="ferrous-video")
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_executor, functools.partial(fn, *args, **kwargs))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        raise


@dataclass(frozen=True)
class VideoRequest:
    model: str
    task: Literal["classify", "embed"] = "classify"
    every: float = 1.0
    top_k: int = 3
    asr_model: str = ""


@dataclass(frozen=True)
class VideoProgress:
    stage: Literal["transcript", "frames"]
    done: int
    total: int


@dataclass(frozen=True)
class VideoFrame:
    t: float
    labels: list[Label] | None = None
    embedding: list[float] | None = None


@dataclass(frozen=True)
class VideoNotice:
    message: str


@dataclass(frozen=True)
class VideoDone:
    duration: float
    frames: int
    transcript: Transcript | None = None
    notices: list[str] = field(default_factory=list)


VideoEvent = VideoProgress | VideoFrame | TranscriptSegment | VideoNotice | VideoDone


async def analyze(
    gateway: Gateway, principal: Principal, data: bytes, req: VideoRequest
) -> AsyncGenerator[VideoEvent, None]:
    """The events of one analysis (see the module), the soundtrack first, then the frames."""
    info: VideoInfo = await _in_thread(probe, data, max_seconds=MAX_VIDEO_SECONDS)
    total = math.ceil(info.duration / req.every) if info.duration else 0
    if total > MAX_FRAMES:
        raise BadRequest(
            f"every {req.every:g} s of {info.duration:.0f} s is {total} frames; one request "
            f"samples at most {MAX_FRAMES}: sample less often"
        )
    notices: list[str] = []
    transcript: Transcript | None = None
    if info.has_audio and req.asr_model:
        audio = await _in_thread(soundtrack, data, max_seconds=MAX_VIDEO_SECONDS)
        if audio:
            yield VideoProgress("transcript", 0, 1)
            # Word timings make the segments' times those of their first and last word
            # (a segment alone is timed to Whisper's coarse timestamp tokens).
            options = TranscribeOptions(word_timestamps=True)
            pieces = transcribe(gateway, principal, req.asr_model, audio, options)
            async with contextlib.aclosing(pieces):
                async for item in pieces:
                    if isinstance(item, Transcript):
                        transcript = item
                    else:
                        yield item
            yield VideoProgress("transcript", 1, 1)
    elif info.has_audio:
        notices.append(
            "the soundtrack was not transcribed: name a speech recognition model in asr_model "
            "(ferrous pull whisper-tiny.en)"
        )
        yield VideoNotice(notices[-1])

    stop = threading.Event()
    frames: Iterator[tuple[float, bytes]] = sample_frames(
        data, every=req.every, max_seconds=MAX_VIDEO_SECONDS, stop=stop
    )
    done = 0
    try:
        while True:
            batch = await _in_thread(lambda: list(itertools.islice(frames, _BATCH)))
            if not batch:
                break
            if done + len(batch) > MAX_FRAMES:
                raise BadRequest(f"the video has more than {MAX_FRAMES} frames to sample")
            images = [jpeg for _, jpeg in batch]
            if req.task == "classify":
                result = await classify(gateway, principal, req.model, images, top_k=req.top_k)
                for (t, _), labels in zip(batch, result.labels, strict=True):
                    yield VideoFrame(t, labels=labels)
            else:
                vectors, _ = await embed(gateway, principal, req.model, images)
                for (t, _), vector in zip(batch, vectors.vectors, strict=True):
                    yield VideoFrame(t, embedding=vector)
            done += len(batch)
            yield VideoProgress("frames", done, max(total, done))
    finally:
        stop.set()
        close = getattr(frames, "close", None)
        if close is not None:
            await _in_thread(close)
    yield VideoDone(info.duration, done, transcript, notices)


def segment_json(s: TranscriptSegment) -> dict[str, Any]:
    return {"start": s.start, "end": s.end, "text": s.text.strip()}


def frame_json(f: VideoFrame) -> dict[str, Any]:
    out: dict[str, Any] = {"t": f.t}
    if f.labels is not None:
        out["labels"] = [{"label": x.label, "score": x.score} for x in f.labels]
    if f.embedding is not None:
        out["embedding"] = f.embedding
    return out


def request_of(form: Any) -> VideoRequest:
    """The analysis a form asks for; InvalidParam naming a bad field."""
    model = form_text(form, "model")
    if not model:
        raise InvalidParam("model", "the request needs an image model in model")
    task = form_text(form, "task") or "classify"
    if task not in ("classify", "embed"):
        raise InvalidParam("task", "task is classify or embed")
    try:
        every = float(form_text(form, "every") or 1.0)
        top_k = int(form_text(form, "top_k") or 3)
    except ValueError:
        raise InvalidParam("every", "every is a number of seconds, top_k a whole number") from None
    if not math.isfinite(every) or every < 0.1:
        raise InvalidParam("every", "every must be at least 0.1 seconds")
    return VideoRequest(model, task, every, top_k, form_text(form, "asr_model"))  # type: ignore[arg-type]


def event_of(ev: VideoEvent) -> tuple[str, dict[str, Any]]:
    """An event's name and JSON body, as SSE and the job registry carry it."""
    if isinstance(ev, VideoProgress):
        return "progress", {"stage": ev.stage, "done": ev.done, "total": ev.total}
    if isinstance(ev, VideoFrame):
        return "frame", frame_json(ev)
    if isinstance(ev, VideoNotice):
        return "notice", {"message": ev.message}
    if isinstance(ev, VideoDone):
        body: dict[str, Any] = {"duration": ev.duration, "frames": ev.frames}
        if ev.transcript is not None:
            body["transcript"] = ev.transcript.text
        if ev.notices:
            body["notices"] = ev.notices
        return "done", body
    return "segment", segment_json(ev)
