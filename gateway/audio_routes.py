"""OpenAI's audio routes: speech to text (``/v1/audio/transcriptions``, ``/translations``)
and text to speech (``/v1/audio/speech``).

A request is a multipart form, as the official clients send it: ``file`` (the
audio, any common format), ``model``, and optionally ``language``, ``prompt``,
``temperature``, ``response_format`` (``json``, ``text``, ``srt``, ``vtt``,
``verbose_json``), ``timestamp_granularities[]`` (``segment``, ``word``) and
``stream``. The upload is read with a bound (``MAX_AUDIO_BYTES``: 413 past
it, before the rest is read); foreign web origins never get here
(:mod:`gateway.origins` refuses them for every route, a form post included).

With ``stream=true`` the transcript comes as server-sent events while the
model decodes it: a ``transcript.text.delta`` event per segment, then one
``transcript.text.done`` with the whole text. Segments are final when sent.
A translation is English text from speech in any language (a multilingual
model; an English-only one refuses it).

``/v1/audio/speech`` takes JSON (``model``, ``input``, ``voice``, ``speed``,
``response_format`` ``mp3`` (the default), ``opus``, ``aac``, ``flac``,
``wav`` or ``pcm`` (16-bit mono little-endian at the voice's rate, 24 kHz))
and streams the audio as each sentence is synthesised and encoded. A speech
model is one voice: ``voice`` is accepted whatever it names (OpenAI's
clients always send one), and the model's own voice speaks.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Literal

import msgspec
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine import (
    Speech,
    SpeechChunk,
    SpeechOptions,
    TranscribeOptions,
    Transcript,
    TranscriptSegment,
)
from engine.audio import ENCODINGS, AudioEncoder, wav_header
from engine.jobcalls import MAX_AUDIO_BYTES
from gateway.auth import Principal
from gateway.forms import form_flag, form_text, read_form
from gateway.http_common import ClosingStream, post_route, read_body
from gateway.http_common import unless_disconnected as _unless_disconnected
from gateway.interface import Gateway
from gateway.openai_wire import InvalidParam, json_response, openai_error, sse
from gateway.speech import synthesize, transcribe
from protocol.errors import BadRequest

__all__ = ["audio_routes", "srt", "vtt"]

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


def audio_routes(gateway: Gateway) -> list[Route]:
    async def transcriptions(request: Request) -> Response:
        return await _speech_toform_text(gateway, request, "transcribe")

    async def translations(request: Request) -> Response:
        return await _speech_toform_text(gateway, request, "translate")

    async def speech(request: Request) -> Response:
        body = await read_body(gateway, request, SpeechRequest)
        fmt = body.response_format
        if fmt not in SPEECH_FORMATS:
            raise InvalidParam(
                "response_format", f"response_format must be one of {SPEECH_FORMATS}"
            )
        if not math.isfinite(body.speed):
            raise InvalidParam("speed", "speed must be a number")
        options = SpeechOptions(speed=body.speed)
        events = synthesize(gateway, request.state.principal, body.model, body.input, options)
        first = await _unless_disconnected(request, anext(events))  # errors as a status
        media = {"wav": "audio/wav", "pcm": "audio/pcm"}.get(fmt) or ENCODINGS[fmt][2]
        return ClosingStream(_audio_body(first, events, fmt), media_type=media)

    return [
        post_route(gateway, "/v1/audio/transcriptions", transcriptions, openai_error),
        post_route(gateway, "/v1/audio/translations", translations, openai_error),
        post_route(gateway, "/v1/audio/speech", speech, openai_error),
    ]


class SpeechRequest(msgspec.Struct, frozen=True):
    model: str
    input: str
    voice: str | dict[str, str] | None = None  # one model is one voice (see above)
    speed: float = 1.0
    response_format: str = "mp3"
    instructions: str | None = None  # style steering: not something these voices take
    stream_format: Literal["audio"] = "audio"


async def _audio_body(
    first: SpeechChunk | Speech, events: AsyncGenerator[SpeechChunk | Speech, None], fmt: str
) -> AsyncIterator[bytes]:
    """The response body: each sentence encoded as it comes (the header first for wav)."""
    encoder: AudioEncoder | None = None
    item: SpeechChunk | Speech | None = first
    if fmt == "wav" and isinstance(item, SpeechChunk):
        yield wav_header(item.rate)
    try:
        while item is not None and not isinstance(item, Speech):
            if fmt in ("pcm", "wav"):
                yield item.pcm
            else:
                if encoder is None:
                    encoder = AudioEncoder(fmt, item.rate)
                piece = encoder.encode(item.pcm)
                if piece:
                    yield piece
            item = await anext(events, None)
        if encoder is not None:
            yield encoder.close()
    finally:
        await events.aclose()


async def _speech_toform_text(gateway: Gateway, request: Request, task: str) -> Response:
    form = await read_form(request, MAX_AUDIO_BYTES + 64 * 1024)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidParam("file", "the request needs the audio as a file field named 'file'")
        audio = await upload.read()
        model = form_text(form, "model")
        if not model:
            raise InvalidParam("model", "the request needs a model")
        fmt = form_text(form, "response_format") or "json"
        if fmt not in FORMATS:
            raise InvalidParam("response_format", f"response_format must be one of {FORMATS}")
        granularities = {
            str(v)
            for v in form.getlist("timestamp_granularities[]")
            + form.getlist("timestamp_granularities")
        }
        if granularities - {"word", "segment"}:
            raise InvalidParam(
                "timestamp_granularities", "timestamp_granularities are 'word' and 'segment'"
            )
        options = TranscribeOptions(
            language=form_text(form, "language") or None if task == "transcribe" else None,
            prompt=form_text(form, "prompt") or None,
            temperature=_number(form, "temperature"),
            task="translate" if task == "translate" else "transcribe",
            word_timestamps="word" in granularities,
        )
        stream = form_flag(form, "stream")
    finally:
        await form.close()
    principal: Principal = request.state.principal
    events = transcribe(gateway, principal, model, audio, options)
    if stream:
        first = await _unless_disconnected(request, anext(events))  # errors as a status
        return ClosingStream(_sse(first, events))
    result = await _unless_disconnected(request, _last(events))
    return _render(result, fmt, task, options.word_timestamps)


def _number(form: FormData, name: str) -> float:
    raw = form_text(form, name)
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise InvalidParam(name, f"{name} must be a number") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidParam(name, f"{name} must be within 0..1")
    return value


async def _last(events: AsyncIterator[TranscriptSegment | Transcript]) -> Transcript:
    async for item in events:
        if isinstance(item, Transcript):
            return item
    raise BadRequest("the transcription ended without a result")


async def _sse(
    first: TranscriptSegment | Transcript,
    events: AsyncGenerator[TranscriptSegment | Transcript, None],
) -> AsyncIterator[bytes]:
    item: TranscriptSegment | Transcript | None = first
    try:
        while item is not None:
            if isinstance(item, Transcript):
                yield sse({"type": "transcript.text.done", "text": item.text})
                return
            yield sse({"type": "transcript.text.delta", "delta": item.text})
            item = await anext(events, None)
    finally:
        await events.aclose()


def _render(result: Transcript, fmt: str, task: str, words: bool) -> Response:
    if fmt == "text":
        return Response(result.text + "\n", media_type="text/plain; charset=utf-8")
    if fmt == "srt":
        return Response(srt(result.segments), media_type="application/x-subrip; charset=utf-8")
    if fmt == "vtt":
        return Response(vtt(result.segments), media_type="text/vtt; charset=utf-8")
    if fmt == "json":
        return json_response({"text": result.text})
    body: dict[str, object] = {
        "task": task,
        "language": result.language,
        "duration": result.duration,
        "text": result.text,
        "segments": [
            {
                "id": s.id,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "avg_logprob": s.avg_logprob,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in result.segments
        ],
    }
    if words:
        body["words"] = [
            {"word": w.word.strip(), "start": w.start, "end": w.end}
            for s in result.segments
            for w in s.words or ()
        ]
    return json_response(body)


def _stamp(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: list[TranscriptSegment]) -> str:
    """SubRip subtitles: numbered cues from 1, ``HH:MM:SS,mmm`` times."""
    cues = [
        f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(cues)


def vtt(segments: list[TranscriptSegment]) -> str:
    """WebVTT subtitles: the header, then ``HH:MM:SS.mmm`` cues."""
    cues = [
        f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)
