"""Control frames between the gateway and its workers.

Length-prefixed (u32 little-endian) msgspec MessagePack frames on a Unix
stream socket. Structs are ``array_like`` (positional, no field names on the
wire) and tagged by a small integer, one union per direction. Token text does
not travel here: it goes through the generation's ring (:mod:`engine.rings`);
a :class:`Wake` frame only says "that ring turned non-empty".

Pure: framing and message types only; the loops that read and write sockets
live in :mod:`engine.worker` and :mod:`engine.client`.
"""

from __future__ import annotations

import struct

import msgspec

from engine.requests import (
    Adapter,
    ChatMessage,
    ImageOptions,
    Label,
    SamplingParams,
    SpeechOptions,
    ToolFunction,
    TranscribeOptions,
    TranscriptSegment,
)

__all__ = [
    "MAX_FRAME",
    "Ack",
    "AudioPart",
    "Cancel",
    "CancelJob",
    "Classified",
    "Classify",
    "Embed",
    "Embedded",
    "Finished",
    "FrameBuffer",
    "FromWorker",
    "Generate",
    "Hello",
    "ImagesMade",
    "ImagesStep",
    "LoadModel",
    "MakeImages",
    "ModelLoaded",
    "Ping",
    "Pong",
    "Resume",
    "Shutdown",
    "Synthesize",
    "Synthesized",
    "Text",
    "ToWorker",
    "Transcribe",
    "Transcribed",
    "TranscriptPart",
    "UnloadModel",
    "Wake",
    "WorkerError",
    "decode_from_worker",
    "decode_to_worker",
    "encode",
]

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct("<I")


class _Frame(msgspec.Struct, array_like=True, tag_field="t", omit_defaults=False):
    pass


# -- gateway -> worker ---------------------------------------------------------------


class LoadModel(_Frame, tag=1, kw_only=True):
    req: int
    model: str
    path: str
    backend: str
    n_ctx: int
    n_threads: int
    n_batch: int
    n_seq: int
    chat_template: str | None = None
    options: bytes = b""  # the backend's options, encoded by its registry entry
    prefill_chunk: int = 64
    kv_unified: bool = False


class UnloadModel(_Frame, tag=2, kw_only=True):
    req: int
    model: str


class Generate(_Frame, tag=3, kw_only=True):
    gen: int
    request_id: str
    model: str
    ring: str
    prompt: str | None
    messages: list[ChatMessage] | None
    sampling: SamplingParams
    token_ids: bool
    stall_timeout: float
    truncate: bool
    max_prompt_tokens: int
    prepare_timeout: float = 2.0  # seconds to render, tokenize and truncate the prompt
    priority: int = 0  # orders prompt reading within a step (engine.stepplan)
    tenant: str = ""  # with priority: who may pause whom (engine.preemption)
    # Chat with tools (engine.tools): rendered into the prompt; the worker turns
    # the choice into the grammar the answer follows.
    tools: list[ToolFunction] | None = None
    tool_choice: str = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    adapters: list[Adapter] = msgspec.field(default_factory=list)  # LoRA files and scales


class Cancel(_Frame, tag=4, kw_only=True):
    gen: int


class Resume(_Frame, tag=5, kw_only=True):
    """The generation's ring has room again; for a ring over the connection
    (:mod:`engine.netring`), ``tail`` is how many bytes of it the gateway read."""

    gen: int
    tail: int = 0


class Ping(_Frame, tag=6, kw_only=True):
    req: int


class Shutdown(_Frame, tag=7, kw_only=True):
    pass


class Embed(_Frame, tag=8, kw_only=True):
    """Embed ``inputs`` with ``model``; answered by :class:`Embedded` or :class:`WorkerError`."""

    req: int
    model: str
    inputs: list[str]
    truncate: bool
    images: list[bytes] = []  # encoded image files, embedded after ``inputs``


class Transcribe(_Frame, tag=9, kw_only=True):
    """Transcribe ``audio`` (a file's bytes) with ``model``: :class:`TranscriptPart` frames as
    segments are decoded, then :class:`Transcribed` or :class:`WorkerError`."""

    req: int
    model: str
    audio: bytes
    options: TranscribeOptions
    priority: int = 0  # the worker runs jobs of a higher priority first


class Synthesize(_Frame, tag=11, kw_only=True):
    """Speak ``text`` with ``model``: :class:`AudioPart` frames sentence by sentence, then
    :class:`Synthesized` or :class:`WorkerError`."""

    req: int
    model: str
    text: str
    options: SpeechOptions
    priority: int = 0  # the worker runs jobs of a higher priority first


class Classify(_Frame, tag=32, kw_only=True):
    """Classify ``images`` (encoded files) with ``model``: :class:`Classified` or
    :class:`WorkerError`."""

    req: int
    model: str
    images: list[bytes]
    top_k: int
    priority: int = 0


class MakeImages(_Frame, tag=34, kw_only=True):
    """Generate images for ``prompt`` with ``model``: :class:`ImagesStep` frames a sampler
    step at a time, then :class:`ImagesMade` or :class:`WorkerError`."""

    req: int
    model: str
    prompt: str
    options: ImageOptions
    priority: int = 0


class CancelJob(_Frame, tag=10, kw_only=True):
    """Stop job ``req`` (its caller went away); it ends without a reply."""

    req: int


# -- worker -> gateway ---------------------------------------------------------------


class Hello(_Frame, tag=20, kw_only=True):
    pid: int
    backends: list[str]
    # A worker that connected over the network (engine.placement) says which
    # start it answers, and which host it runs on.
    nonce: str = ""
    host: str = ""


class Text(_Frame, tag=37, kw_only=True):
    """A record of generation ``gen``'s text, for a ring over the connection."""

    gen: int
    ids: list[int]
    text: bytes
    extra: bytes = b""


class ModelLoaded(_Frame, tag=21, kw_only=True):
    req: int
    model: str
    load_ms: float
    n_ctx: int
    providers: list[str] = []  # the execution providers its sessions run on (ONNX)


class WorkerError(_Frame, tag=22, kw_only=True):
    """A request (load, unload, embed, generate before it started) failed."""

    req: int
    code: str
    message: str
    retryable: bool
    path: str | None = None  # set for model load failures
    reason: str | None = None
    detail: str | None = None


class Ack(_Frame, tag=26, kw_only=True):
    req: int


class Wake(_Frame, tag=23, kw_only=True):
    gen: int


class Finished(_Frame, tag=24, kw_only=True):
    gen: int
    reason: str
    prompt_tokens: int
    completion_tokens: int
    load_ms: float
    queue_ms: float
    ttft_ms: float
    total_ms: float
    decode_tok_s: float
    error_code: str | None
    error_message: str | None
    cached_tokens: int = 0  # prompt tokens copied from a cached prefix

    @classmethod
    def ended(
        cls, gen: int, reason: str, code: str | None = None, message: str | None = None
    ) -> Finished:
        """A generation that ended before producing anything: no tokens, no timings."""
        return cls(
            gen=gen,
            reason=reason,
            prompt_tokens=0,
            completion_tokens=0,
            load_ms=0.0,
            queue_ms=0.0,
            ttft_ms=0.0,
            total_ms=0.0,
            decode_tok_s=0.0,
            error_code=code,
            error_message=message,
        )


class Classified(_Frame, tag=33, kw_only=True):
    """Each image's top labels, in input order."""

    req: int
    labels: list[list[Label]]


class ImagesStep(_Frame, tag=35, kw_only=True):
    """Sampler step ``step`` of ``steps`` is done."""

    req: int
    step: int
    steps: int


class ImagesMade(_Frame, tag=36, kw_only=True):
    """The images (PNG files) and the seed that makes them again."""

    req: int
    images: list[bytes]
    seed: int


class Embedded(_Frame, tag=27, kw_only=True):
    """Unit-length vectors, row after row, as native float32 (``dim`` floats each).

    Raw float32 is a third the size of MessagePack floats and becomes a list
    again with one ``array.frombytes`` on the gateway side.
    """

    req: int
    dim: int
    data: bytes
    prompt_tokens: int


class TranscriptPart(_Frame, tag=28, kw_only=True):
    """Segments of a transcription in progress, final as sent."""

    req: int
    segments: list[TranscriptSegment]


class Transcribed(_Frame, tag=29, kw_only=True):
    """The end of a transcription: the language spoken and the audio's length in seconds."""

    req: int
    language: str
    duration: float


class AudioPart(_Frame, tag=30, kw_only=True):
    """16-bit little-endian mono PCM of the next sentence of a synthesis."""

    req: int
    pcm: bytes
    rate: int  # samples a second


class Synthesized(_Frame, tag=31, kw_only=True):
    """The end of a synthesis: seconds of audio produced, at ``sample_rate``."""

    req: int
    seconds: float
    sample_rate: int


class Pong(_Frame, tag=25, kw_only=True):
    req: int
    models: list[str]
    active: int
    queued: int
    rss_bytes: int
    tokens_generated: int
    tokens_read_ahead: int = 0  # a finished chat's next turn markers (engine.readahead)


ToWorker = (
    LoadModel
    | UnloadModel
    | Generate
    | Cancel
    | Resume
    | Ping
    | Shutdown
    | Embed
    | Transcribe
    | Synthesize
    | Classify
    | MakeImages
    | CancelJob
)
FromWorker = (
    Hello
    | Text
    | ModelLoaded
    | WorkerError
    | Wake
    | Finished
    | Pong
    | Ack
    | Embedded
    | TranscriptPart
    | Transcribed
    | AudioPart
    | Synthesized
    | Classified
    | ImagesStep
    | ImagesMade
)

_encoder = msgspec.msgpack.Encoder()
_to_worker: msgspec.msgpack.Decoder[ToWorker] = msgspec.msgpack.Decoder(ToWorker)
_from_worker: msgspec.msgpack.Decoder[FromWorker] = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: ToWorker | FromWorker) -> bytes:
    """One frame: length prefix + MessagePack body."""
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def decode_to_worker(body: bytes) -> ToWorker:
    return _to_worker.decode(body)


def decode_from_worker(body: bytes) -> FromWorker:
    return _from_worker.decode(body)


class FrameBuffer:
    """Accumulates stream bytes and yields complete frame bodies."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        # Fast path: nothing buffered (the usual case), parse straight from ``data``.
        buf: bytes | bytearray = data if not self._buf else self._buf + data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "little")
            if n > MAX_FRAME:
                raise ValueError(f"control frame of {n} bytes exceeds {MAX_FRAME}")
            if end - pos - 4 < n:
                break
            frames.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        self._buf = bytearray(buf[pos:]) if pos < end else bytearray()
        return frames
