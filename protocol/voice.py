"""Protocol v1 voice messages: listen streams, audio in and out, speech.

A ``listen`` stream takes 16-bit mono PCM (``audio`` messages, or binary
frames on ``ferrous.v1.json``) and gives ``speech`` edges and ``transcript``
partials and finals; with a ``reply`` each utterance is answered as a
generation whose text comes as ``delta`` and its speech as ``audio``.
``speak`` gives one text's speech. See docs/protocol.md, "Voice".
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .fields import (
    ConversationId,
    GenerationId,
    ModelName,
    Options,
    Priority,
    _ClientBase,
    _ServerBase,
)

__all__ = [
    "Audio",
    "AudioFormat",
    "AudioOut",
    "Listen",
    "Reply",
    "Speak",
    "SpeechEdge",
    "Speed",
    "TranscriptEvent",
    "VadOptions",
]

# The encodings audio out may take: raw 16-bit PCM, or a compressed stream.
AudioFormat = Literal["pcm16", "mp3", "opus", "aac", "flac"]
Speed = Annotated[float, Meta(ge=0.5, le=2.0)]


class VadOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How a ``listen`` stream tells speech from silence (voice-activity detection)."""

    threshold: Annotated[float, Meta(ge=0.05, le=0.95)] = 0.5
    silence_ms: Annotated[int, Meta(ge=100, le=5000)] = 400  # this much silence ends speech
    min_speech_ms: Annotated[int, Meta(ge=32, le=2000)] = 96  # this much speech starts it
    pad_ms: Annotated[int, Meta(ge=0, le=1000)] = 192  # audio kept from before the start


class Reply(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Voice conversation: answer each finished utterance with ``model``, spoken by ``voice``.

    Each answer is a generation ``<listen id>.<utterance>``: ``started``,
    ``delta`` text, ``audio`` a sentence at a time while the text streams,
    ``done``. With ``barge_in``, speech that starts while an answer is being
    generated or spoken cancels it (``done`` with ``cancelled``); the
    conversation keeps the sentences whose audio was sent.
    """

    model: ModelName
    voice: ModelName
    conversation: ConversationId | None = None
    instructions: Annotated[str, Meta(max_length=16_384)] | None = None  # a system turn
    options: Options | None = None
    speed: Speed = 1.0
    format: AudioFormat = "pcm16"
    barge_in: bool = True
    priority: Priority = 0


class Listen(_ClientBase, tag="listen"):
    """Open an audio stream: speech recognised as it is heard.

    Audio follows as ``audio`` messages, or (``ferrous.v1.json`` only) as
    binary frames of raw samples for the one open stream: 16-bit
    little-endian mono PCM at ``rate``. Each utterance gives ``speech``
    start and end events, ``transcript`` partials (``settled``: the leading
    words that will not change) and one final transcript.
    """

    id: GenerationId
    model: ModelName  # a speech-recognition model
    rate: Annotated[int, Meta(ge=8000, le=48000)] = 16000
    language: Annotated[str, Meta(max_length=16)] | None = None
    partials: bool = True
    vad: VadOptions | None = None
    reply: Reply | None = None


class Audio(_ClientBase, tag="audio"):
    """Samples for ``listen`` stream ``id``; ``end``: no more audio (speech in progress
    is finished and transcribed, then the stream's ``done``)."""

    id: GenerationId
    data: Annotated[bytes, Meta(max_length=16 * 1024 * 1024)] = b""
    end: bool = False


class Speak(_ClientBase, tag="speak"):
    """Speak ``text`` with a speech-synthesis ``model``: ``audio`` chunks a sentence at a
    time, then ``done``."""

    id: GenerationId
    model: ModelName
    text: Annotated[str, Meta(min_length=1, max_length=4096)]
    speed: Speed = 1.0
    format: AudioFormat = "pcm16"
    seed: Annotated[int, Meta(ge=0, lt=2**32)] | None = None


class SpeechEdge(_ServerBase, tag="speech"):
    """Utterance ``utterance`` of listen stream ``id`` started or ended, ``at`` seconds into
    the stream's audio."""

    id: str
    utterance: int
    event: Literal["start", "end"]
    at: float
    n: int | None = None  # the message's number in the session (resume)


class TranscriptEvent(_ServerBase, tag="transcript"):
    """The text of utterance ``utterance`` so far (``final``: never revised).

    A partial's ``settled`` is its leading words that later partials and the
    final transcript keep as they are; the rest may still change.
    """

    id: str
    utterance: int
    text: str
    start: float  # seconds into the stream's audio
    end: float
    final: bool = False
    settled: str = ""
    n: int | None = None  # the message's number in the session (resume)


class AudioOut(_ServerBase, tag="audio"):
    """A chunk of generation ``id``'s speech; ``seq`` counts its chunks from 0. With
    ``pcm16``, 16-bit little-endian mono samples at ``rate``. ``text``: the sentence
    that starts in this chunk. Counted against flow-control credits like text."""

    id: str
    seq: int
    data: bytes
    rate: int
    format: str = "pcm16"
    text: str | None = None
    n: int | None = None  # the message's number in the session (resume)
