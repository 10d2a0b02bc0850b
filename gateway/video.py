"""Video analysis: a clip's frames classified or embedded and its soundtrack transcribed.

``POST /v1/video/analyze`` takes a multipart form: ``file`` (the video: mp4,
webm, mkv, mov, ... up to :data:`MAX_VIDEO_BYTES` and :data:`MAX_VIDEO_SECONDS`),
``model`` (an image model), ``task`` (``classify``, the default, or
``embed``), ``every`` (seconds between sampled frames, 1 by default, at least
0.1), ``top_k`` (3), ``asr_model`` (a speech recognition model for the
soundtrack) and ``stream``. The answer::

    {"duration": 60.0, "model": "open-nsfw",
     "frames": [{"t": 0.0, "labels": [{"label": "sfw", "score": 0.98}, ...]}, ...],
     "transcript": {"text": "...", "segments": [{"start": 0.0, "end": 2.1, "text": "..."}]},
     "notices": []}

Frames are decoded and scaled in a thread of the gateway, eight at a time
(:mod:`engine.video`), and go to the model's worker as JPEGs; the soundtrack
is taken out as Opus and transcribed by the speech model's worker. With a
soundtrack and no ``asr_model`` the answer says which model to name in
``notices``. With ``stream=true`` the same comes as server-sent events while
it is computed: ``progress`` (``stage`` ``transcript`` or ``frames``,
``done`` of ``total``), ``segment``, ``frame``, ``notice`` and a last ``done``
with the duration; a client that goes away stops the work (its decoding
between batches, its jobs in the workers).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import Label, TranscribeOptions, Transcript, TranscriptSegment
from engine.video import VideoInfo, probe, sample_frames, soundtrack
from gateway.auth import Principal
from gateway.forms import form_flag, form_text, read_form
from gateway.generation import embed
from gateway.http_common import ClosingStream, guarded, unless_disconnected
from gateway.image_routes import classify
from gateway.interface import Gateway
from gateway.model_routes import native_error
from gateway.openai_wire import InvalidParam
from gateway.speech import transcribe
from protocol.errors import BadRequest, FerrousError

__all__ = ["MAX_VIDEO_BYTES", "MAX_VIDEO_SECONDS", "VideoRequest", "analyze", "video_routes"]

MAX_VIDEO_BYTES = 128 * 1024 * 1024
MAX_VIDEO_SECONDS = 1800.0  # half an hour; its soundtrack fits one speech job
MAX_FRAMES = 3600  # frames one request samples
_BATCH = 8


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
    info: VideoInfo = await asyncio.to_thread(probe, data, max_seconds=MAX_VIDEO_SECONDS)
    total = math.ceil(info.duration / req.every) if info.duration else 0
    if total > MAX_FRAMES:
        raise BadRequest(
            f"every {req.every:g} s of {info.duration:.0f} s is {total} frames; one request "
            f"samples at most {MAX_FRAMES}: sample less often"
        )
    notices: list[str] = []
    transcript: Transcript | None = None
    if info.has_audio and req.asr_model:
        audio = await asyncio.to_thread(soundtrack, data, max_seconds=MAX_VIDEO_SECONDS)
        if audio:
            yield VideoProgress("transcript", 0, 1)
            # Word timings make the segments' times those of their first and last word
            # (a segment alone is timed to Whisper's coarse timestamp tokens).
            options = TranscribeOptions(word_timestamps=True)
            async for item in transcribe(gateway, principal, req.asr_model, audio, options):
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

    frames: Iterator[tuple[float, bytes]] = sample_frames(
        data, every=req.every, max_seconds=MAX_VIDEO_SECONDS
    )
    done = 0
    try:
        while True:
            batch = await asyncio.to_thread(lambda: list(itertools.islice(frames, _BATCH)))
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
        close = getattr(frames, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
    yield VideoDone(info.duration, done, transcript, notices)


def _segment(s: TranscriptSegment) -> dict[str, Any]:
    return {"start": s.start, "end": s.end, "text": s.text.strip()}


def _frame(f: VideoFrame) -> dict[str, Any]:
    out: dict[str, Any] = {"t": f.t}
    if f.labels is not None:
        out["labels"] = [{"label": x.label, "score": x.score} for x in f.labels]
    if f.embedding is not None:
        out["embedding"] = f.embedding
    return out


def _request(form: Any) -> VideoRequest:
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


def video_routes(gateway: Gateway) -> list[Route]:
    async def analyze_route(request: Request) -> Response:
        form = await read_form(request, MAX_VIDEO_BYTES + 64 * 1024)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidParam(
                    "file", "the request needs the video as a file field named 'file'"
                )
            data = await upload.read()
            req = _request(form)
            stream = form_flag(form, "stream")
        finally:
            await form.close()
        events = analyze(gateway, request.state.principal, data, req)
        if stream:
            first = await unless_disconnected(request, anext(events))  # errors as a status
            return ClosingStream(_sse(first, events))
        frames: list[dict[str, Any]] = []
        last: VideoDone | None = None

        async def whole() -> None:
            nonlocal last
            async for ev in events:
                if isinstance(ev, VideoFrame):
                    frames.append(_frame(ev))
                elif isinstance(ev, VideoDone):
                    last = ev

        await unless_disconnected(request, whole())
        assert last is not None
        body: dict[str, Any] = {
            "duration": last.duration,
            "model": req.model,
            "frames": frames,
            "transcript": None
            if last.transcript is None
            else {
                "text": last.transcript.text,
                "segments": [_segment(s) for s in last.transcript.segments],
            },
            "notices": last.notices,
        }
        return Response(msgspec.json.encode(body), media_type="application/json")

    return [
        Route("/v1/video/analyze", guarded(gateway, native_error, analyze_route), methods=["POST"])
    ]


async def _sse(
    first: VideoEvent, events: AsyncGenerator[VideoEvent, None]
) -> AsyncGenerator[bytes, None]:
    """The events as server-sent events; a failure after the first is an ``error`` event."""
    ev: VideoEvent | None = first
    try:
        while ev is not None:
            name, data = _event(ev)
            yield b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"
            ev = await anext(events, None)
    except FerrousError as exc:
        error = {"code": exc.code.value, "message": exc.message}
        yield b"event: error\ndata: " + msgspec.json.encode(error) + b"\n\n"
    finally:
        await events.aclose()


def _event(ev: VideoEvent) -> tuple[str, dict[str, Any]]:
    if isinstance(ev, VideoProgress):
        return "progress", {"stage": ev.stage, "done": ev.done, "total": ev.total}
    if isinstance(ev, VideoFrame):
        return "frame", _frame(ev)
    if isinstance(ev, VideoNotice):
        return "notice", {"message": ev.message}
    if isinstance(ev, VideoDone):
        return "done", {"duration": ev.duration, "frames": ev.frames}
    return "segment", _segment(ev)
