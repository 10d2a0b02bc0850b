"""What the gateway asks of the engine and what it gets back.

These are plain msgspec Structs: the gateway builds a :class:`GenerateRequest`
from a protocol message and turns :class:`TokenDelta` / :class:`GenerationDone`
events back into protocol messages. They also travel inside control frames to
the workers, so they must stay serialisable.
"""

from __future__ import annotations

import enum
import itertools
import os
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from engine.logprobs import TokenLogprob
from engine.textstream import MAX_STOP_CHARS
from protocol.errors import BadRequest

__all__ = [
    "Adapter",
    "ChatMessage",
    "Classification",
    "Embeddings",
    "ErrorInfo",
    "FinishReason",
    "GenerateRequest",
    "GenerationDone",
    "ImageOptions",
    "ImageStep",
    "Images",
    "Label",
    "SamplingParams",
    "Speech",
    "SpeechChunk",
    "SpeechOptions",
    "Timings",
    "TokenDelta",
    "ToolCall",
    "ToolFunction",
    "TranscribeOptions",
    "Transcript",
    "TranscriptSegment",
    "Usage",
    "Word",
    "new_request_id",
]

_ids = itertools.count(1)


def new_request_id() -> str:
    """A request id unique within this process and readable in logs."""
    return f"req-{os.getpid():x}-{next(_ids)}"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-generation token or a stop sequence
    LENGTH = "length"  # max_tokens or the context window
    CANCELLED = "cancelled"  # cancel(), or the consumer went away
    STALLED = "stalled"  # the consumer did not read for longer than the stall timeout
    ERROR = "error"  # see GenerationDone.error


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Sampling options. Defaults follow common local-server practice.

    ``temperature=0`` is greedy decoding. ``seed=None`` draws a fresh seed.
    ``max_tokens=None`` generates until an end token or the context is full.

    Structured output (at most one of these):
    ``grammar`` is a GBNF grammar (rule ``root``) the output must follow;
    ``json_schema`` is a JSON Schema, as JSON text, the output must match;
    ``json=True`` asks for any JSON *object* (Ollama's ``format: "json"`` has an
    object root too); ``lark`` is a grammar in llguidance's Lark dialect (the
    worker sets it for tool calls, see :mod:`engine.tools`). The worker compiles
    them, so the gateway never needs a grammar engine; an invalid grammar or
    schema fails the request with ``bad_request`` before any text is produced.
    """

    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.8
    top_k: Annotated[int, Meta(ge=0)] = 40
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.9
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] = 1.1
    seed: Annotated[int, Meta(ge=0, lt=2**32)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    stop: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]], Meta(max_length=16)
    ] = msgspec.field(default_factory=list)
    # End-of-generation tokens are never chosen (as llama.cpp's ignore_eos): benchmarks
    # get text for all of max_tokens, not hidden end tokens between invented turns.
    ignore_eos: bool = False
    grammar: str | None = None
    json_schema: str | None = None
    json: bool = False
    lark: str | None = None
    # Log-probabilities of the sampled tokens (and this many alternatives each)
    # in the deltas; None: not computed.
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None

    def constraint(self) -> tuple[str, str] | None:
        """The output constraint as ``(kind, source)``, kind ``grammar``/``json_schema``/``json``.

        A method rather than a ``__post_init__`` check so that a bad combination
        is reported as a typed ``bad_request`` for that one generation (the
        worker asks this before queueing) instead of failing frame decoding.
        """
        given = [
            (kind, source)
            for kind, source in (
                ("grammar", self.grammar),
                ("json_schema", self.json_schema),
                ("json", "" if self.json else None),
                ("lark", self.lark),
            )
            if source is not None
        ]
        if len(given) > 1:
            names = " and ".join(kind for kind, _ in given)
            raise BadRequest(f"set at most one output format (got {names})")
        return given[0] if given else None


class Adapter(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A LoRA adapter file applied to a generation, at ``scale`` (1: as trained).

    The gateway resolves adapter names (the store's models that carry one) to
    their files; the engine only sees paths it was given by the gateway.
    """

    path: str
    scale: Annotated[float, Meta(ge=-4.0, le=4.0)] = 1.0


class ToolCall(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A call the model made: the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str


class ToolFunction(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A function the model may call; ``parameters`` is its JSON Schema as JSON text."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    parameters: str = ""  # "" = any JSON object


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A chat turn. Assistant turns may carry ``tool_calls``; ``tool`` turns answer one
    call, named by ``tool_call_id``."""

    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: str
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # Encoded images (PNG, JPEG, ...) the turn shows a vision language model; each is
    # read where the turn's text begins (TextGenerator.tokenize_with_images).
    images: list[bytes] | None = None


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One generation: a raw ``prompt`` or chat ``messages`` (rendered with the model's template)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    request_id: str = msgspec.field(default_factory=new_request_id)
    token_ids: bool = False  # include token ids in deltas
    # Chat only: drop the oldest non-system messages until the prompt fits the
    # context window (leaving room to answer) instead of failing.
    truncate: bool = False
    max_prompt_tokens: int = 0  # 0 = only the context window limits the prompt
    # Who asks (a tenant, else the user) and how urgent: when every sequence slot is
    # busy, waiting requests start by priority, then in turns between tenants.
    tenant: str | None = None
    priority: int = 0
    weight: float = 1.0  # the tenant's share of turns against others' (engine.fairqueue)
    # Seconds the model stays loaded after this request when idle (None = the
    # engine's default; < 0 = forever; 0 = unload as soon as nothing runs).
    keep_alive: float | None = None
    # Chat only: functions the model may call (rendered by the chat template, or
    # by engine.tools' generic format), and whether it may (``auto``), must
    # (``required``, or ``tool_name`` for one function) or may not (``none``).
    tools: list[ToolFunction] | None = None
    tool_choice: Literal["auto", "required", "none"] = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    # LoRA adapters over the model for this generation (llama.cpp models).
    adapters: list[Adapter] = msgspec.field(default_factory=list)


class TokenDelta(msgspec.Struct, frozen=True, gc=False):
    """New text of a generation. ``seq`` counts deltas from 0, with no gaps."""

    text: str
    seq: int
    token_ids: list[int] | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of this delta, when asked


class Usage(msgspec.Struct, frozen=True, gc=False):
    """Token counts; ``cached_tokens`` of the prompt were copied from a cached prefix, not read."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class Timings(msgspec.Struct, frozen=True, gc=False):
    """Timings of one generation, measured in the worker.

    ``load_ms`` is how long the serving worker took to load the model;
    ``ttft_ms`` runs from the worker accepting the request to the first token
    (prompt processing included); ``decode_tok_s`` is completion tokens after the
    first divided by the time after the first token.
    """

    load_ms: float
    queue_ms: float
    ttft_ms: float
    total_ms: float
    decode_tok_s: float


class ErrorInfo(msgspec.Struct, frozen=True):
    code: str
    message: str
    retryable: bool = False


class GenerationDone(msgspec.Struct, frozen=True):
    """The last event of every generation that started."""

    request_id: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    error: ErrorInfo | None = None


class Embeddings(msgspec.Struct, frozen=True):
    """Result of :meth:`engine.EngineClient.embed`: one vector per input, in input order.

    Vectors are L2-normalised (unit length), as Ollama's ``/api/embed`` returns
    them, so a dot product is the cosine similarity. ``prompt_tokens`` counts the
    tokens read, after any truncation.
    """

    vectors: list[list[float]]
    prompt_tokens: int
    model: str


# -- speech recognition -------------------------------------------------------------


class TranscribeOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How to transcribe: ``task`` ``translate`` gives English text from any language."""

    language: str | None = None  # ISO 639-1; None = detected from the first 30 s
    prompt: str | None = None  # earlier text or spellings to condition on
    temperature: float = 0.0
    task: Literal["transcribe", "translate"] = "transcribe"
    word_timestamps: bool = False
    # Live audio (a WebSocket listen stream): a short clip decoded greedily with the
    # model's audio context cut to the clip, one segment, no timestamps inside it.
    live: bool = False


class Word(msgspec.Struct, frozen=True):
    start: float  # seconds from the start of the audio
    end: float
    word: str
    probability: float


class TranscriptSegment(msgspec.Struct, frozen=True, kw_only=True):
    """A stretch of speech and its text, as the model decoded it (final: never revised)."""

    id: int
    start: float  # seconds
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    words: list[Word] | None = None


class Transcript(msgspec.Struct, frozen=True, kw_only=True):
    """Result of :meth:`engine.EngineClient.transcribe`: the whole text and its segments."""

    text: str
    language: str
    duration: float  # seconds of audio
    segments: list[TranscriptSegment]
    model: str = ""


# -- speech synthesis ---------------------------------------------------------------


class SpeechOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How to speak: ``speed`` 1.0 is the voice's own pace; ``seed`` fixes the output."""

    speed: float = 1.0
    seed: int | None = None


class SpeechChunk(msgspec.Struct, frozen=True):
    """A piece of :meth:`engine.EngineClient.synthesize_stream`: 16-bit little-endian mono
    PCM (a sentence) at ``rate`` samples a second."""

    pcm: bytes
    rate: int


class Speech(msgspec.Struct, frozen=True, kw_only=True):
    """The end of :meth:`engine.EngineClient.synthesize_stream`: what was produced."""

    seconds: float
    sample_rate: int
    model: str = ""


# -- images ---------------------------------------------------------------------------


class Label(msgspec.Struct, frozen=True, array_like=True):
    """One of a classifier's labels with its score (a probability, 0..1)."""

    label: str
    score: float


class Classification(msgspec.Struct, frozen=True):
    """Result of :meth:`engine.EngineClient.classify`: for each image, in input order, its
    ``top_k`` labels, likeliest first."""

    labels: list[list[Label]]
    model: str


class ImageOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How to generate images: ``n`` of them, ``width`` x ``height`` (0: the model's own
    size), ``steps`` of the sampler (0: the model's default), ``seed`` (None: drawn, and
    reported so the images can be made again)."""

    n: int = 1
    width: int = 0
    height: int = 0
    steps: int = 0
    seed: int | None = None


class ImageStep(msgspec.Struct, frozen=True):
    """A piece of :meth:`engine.EngineClient.generate_images_stream`: ``step`` of ``steps``
    sampler steps is done."""

    step: int
    steps: int


class Images(msgspec.Struct, frozen=True, kw_only=True):
    """The end of :meth:`engine.EngineClient.generate_images_stream`: PNG files, and the
    seed that makes them again."""

    images: list[bytes]
    seed: int
    model: str = ""
