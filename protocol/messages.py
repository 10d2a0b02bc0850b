"""Protocol v1 message types: one tagged union per direction.

Every message is a JSON object (text frames, subprotocol ``ferrous.v1.json``)
or a MessagePack map (binary frames, ``ferrous.v1.msgpack``) whose ``type``
field names it. Client messages reject unknown fields, so a typo is an error
rather than a silently ignored option; server messages may gain fields (with
defaults) in later v1 revisions, and clients must ignore fields they do not
know. Types of existing fields never change.

A session::

    client                              server
    hello ─────────────────────────────▶
          ◀───────────────────────────── ready      (session id, limits, models)
    chat {id: "g1", ...} ──────────────▶
          ◀───────────────────────────── started    {id: "g1", conversation}
          ◀───────────────────────────── delta      {id: "g1", seq: 0, text}
          ◀───────────────────────────── delta      ...
          ◀───────────────────────────── done       {id: "g1", finish_reason, usage, timings}
    credit {bytes} ────────────────────▶            (only with flow control on)
    ack {n} ───────────────────────────▶            (frees the server's replay buffer)
    cancel {id} ───────────────────────▶
    heartbeat ─────────────────────────▶
          ◀───────────────────────────── heartbeat
          ◀───────────────────────────── error      {code, message, id?}
    pull {id, model} ──────────────────▶
          ◀───────────────────────────── progress   {id, status, total?, completed?} ...
          ◀───────────────────────────── progress   {id, status: "success"}  (or error {id})
    listen {id, model, rate, reply?} ──▶            (audio: audio {id, data} or binary frames)
          ◀───────────────────────────── speech     {id, utterance, event: start|end}
          ◀───────────────────────────── transcript {id, utterance, text, settled, final}
          ◀───────────────────────────── started/delta/audio/done  {id: "<id>.<utterance>"} (reply)
    speak {id, model, text} ───────────▶
          ◀───────────────────────────── audio      {id, seq, data, rate} ... done

Every message about a generation (queued, started, delta, tool_call, done,
error with an id, progress) carries ``n``, its number in the session (1, 2,
3, ...). After a dropped connection a client opens a new one and sends
``hello {resume: <ready.resume_token>, last: <highest n seen>}``: the server
answers ``ready {resumed: true}``, sends every numbered message after ``last``
again, then the live stream, with the session's generations and
conversations as they were (see docs/protocol.md, "Resuming a session").
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .errors import ErrorCode
from .fields import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    ConversationId,
    Format,
    GenerationId,
    KeepAlive,
    ModelName,
    Options,
    Priority,
    _ClientBase,
    _ServerBase,
)
from .images import Draw, ImageOut
from .video import LabelScore, VideoEvent, Watch
from .voice import (
    Audio,
    AudioFormat,
    AudioOut,
    Listen,
    Reply,
    Speak,
    SpeechEdge,
    TranscriptEvent,
    VadOptions,
)

__all__ = [
    "CLIENT_MESSAGES",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "SERVER_MESSAGES",
    "SUBPROTOCOL_JSON",
    "SUBPROTOCOL_MSGPACK",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "Ack",
    "AdapterChoice",
    "Adapters",
    "Audio",
    "AudioFormat",
    "AudioOut",
    "Cancel",
    "Chat",
    "ChatMessage",
    "ClientMessage",
    "ConversationId",
    "Credit",
    "Delta",
    "Done",
    "Draw",
    "Error",
    "Forget",
    "Format",
    "Generate",
    "GenerationId",
    "Heartbeat",
    "Hello",
    "ImageOut",
    "KeepAlive",
    "LabelScore",
    "Limits",
    "Listen",
    "Logprob",
    "ModelName",
    "Options",
    "Priority",
    "Progress",
    "Pull",
    "Queued",
    "Ready",
    "Reply",
    "Restarted",
    "ServerHeartbeat",
    "ServerMessage",
    "Speak",
    "SpeechEdge",
    "Started",
    "Timings",
    "Tool",
    "ToolCallEvent",
    "ToolCallPart",
    "TopLogprob",
    "TranscriptEvent",
    "Usage",
    "VadOptions",
    "VideoEvent",
    "Watch",
]

SUBPROTOCOL_JSON = "ferrous.v1.json"
SUBPROTOCOL_MSGPACK = "ferrous.v1.msgpack"
# Browsers cannot set headers on a WebSocket: they may offer the token as a
# second subprotocol "ferrous.token.<JWT>"; the server never echoes it back.
TOKEN_SUBPROTOCOL_PREFIX = "ferrous.token."

ToolName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
CallId = Annotated[str, Meta(min_length=1, max_length=128)]


class ToolCallPart(msgspec.Struct, forbid_unknown_fields=True):
    """A call an assistant turn made: ``arguments`` is JSON text (an object)."""

    id: CallId
    name: ToolName
    arguments: Annotated[str, Meta(max_length=1_000_000)]


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A turn. An ``assistant`` turn may carry the ``tool_calls`` it made; a ``tool``
    turn answers the call named by ``tool_call_id`` with its result as ``content``.

    ``images``: encoded pictures (PNG, JPEG, WebP, ...) a ``user`` turn shows a vision
    language model, base64 in JSON and binary in MessagePack. They ride in the
    message's frame (``ready.limits.max_frame_bytes``); the conversation keeps them
    for later turns, and a prompt shows the model the newest eight. A model that
    reads no images refuses them (``bad_request``)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, Meta(max_length=1_000_000)]
    tool_calls: Annotated[list[ToolCallPart], Meta(max_length=128)] | None = None
    tool_call_id: CallId | None = None
    images: Annotated[list[bytes], Meta(max_length=8)] | None = None


class AdapterChoice(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A LoRA adapter for one generation: ``name`` is a model made with ``ADAPTER`` over
    the same base as the generation's model; ``scale`` weighs it (1: as trained, 0: off).

    Generations with different adapters (or none) on one model share its loaded
    weights. Given at all, the list replaces the model's own adapters."""

    name: ModelName
    scale: Annotated[float, Meta(ge=-4.0, le=4.0)] = 1.0


Adapters = Annotated[list[AdapterChoice], Meta(max_length=4)]


class Tool(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A function the model may call; ``parameters`` is its arguments' JSON Schema."""

    name: ToolName
    description: Annotated[str, Meta(max_length=16_384)] = ""
    parameters: dict[str, Any] | None = None


# -- client -> server -------------------------------------------------------------------


class Hello(_ClientBase, tag="hello"):
    """First message of a session.

    ``credits``: when set, flow control is on: the server sends at most this
    many bytes of delta text before the client grants more with ``credit``.
    ``resume``: the ``resume_token`` of a session whose connection dropped,
    and ``last`` the highest ``n`` received on it: the session continues on
    this connection from the message after ``last``.
    """

    protocol: int = 1
    client: Annotated[str, Meta(max_length=128)] = ""
    credits: Annotated[int, Meta(ge=1)] | None = None
    resume: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    last: Annotated[int, Meta(ge=0)] = 0


class Generate(_ClientBase, tag="generate"):
    """Complete a raw prompt (no chat template)."""

    id: GenerationId
    model: ModelName
    prompt: Annotated[str, Meta(max_length=4_000_000)]
    options: Options | None = None
    token_ids: bool = False
    keep_alive: KeepAlive | None = None  # how long the model stays loaded after this request
    format: Format | None = None  # constrain the output to JSON (or to a schema)
    priority: Priority = 0  # scheduling class (capped by the credential's)
    adapters: Adapters | None = None  # LoRA adapters (see AdapterChoice)


class Chat(_ClientBase, tag="chat"):
    """Continue a conversation the server keeps.

    ``messages`` are appended to conversation ``conversation`` (a new one when
    absent or unknown); the answer is appended too when the generation ends.
    """

    id: GenerationId
    model: ModelName
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=1024)]
    conversation: ConversationId | None = None
    options: Options | None = None
    token_ids: bool = False
    keep_alive: KeepAlive | None = None  # how long the model stays loaded after this request
    format: Format | None = None  # constrain the output to JSON (or to a schema)
    priority: Priority = 0  # scheduling class (capped by the credential's)
    adapters: Adapters | None = None  # LoRA adapters (see AdapterChoice)
    # Functions the model may call (each call arrives as a ``tool_call`` event):
    # ``auto`` lets it choose, ``required`` makes it call one (``tool_name``: that
    # one), ``none`` leaves the tools out.
    tools: Annotated[list[Tool], Meta(max_length=128)] | None = None
    tool_choice: Literal["auto", "required", "none"] = "auto"
    tool_name: ToolName | None = None
    parallel_tool_calls: bool = True


class Cancel(_ClientBase, tag="cancel"):
    id: GenerationId


class Credit(_ClientBase, tag="credit"):
    """Grant the server this many more bytes of delta text (flow control)."""

    bytes: Annotated[int, Meta(ge=1, le=2**31)]


class Ack(_ClientBase, tag="ack"):
    """Every message up to number ``n`` arrived: the server may drop them from its replay buffer.

    Optional: without acks the buffer keeps the latest messages of each
    generation up to the server's limit, which may leave an older gap
    unresumable after a drop.
    """

    n: Annotated[int, Meta(ge=0)]


class Forget(_ClientBase, tag="forget"):
    """Delete a conversation the server keeps."""

    conversation: ConversationId


class Heartbeat(_ClientBase, tag="heartbeat"):
    """Application-level keep-alive (browsers cannot send WebSocket pings)."""

    ts: float | None = None


class Pull(_ClientBase, tag="pull"):
    """Fetch a model into the server's store; ``progress`` messages follow, then success or error.

    ``model`` is a catalog name, or the name to store ``source`` under
    (an https://, hf:// or pypi:// source; server paths are refused).
    ``cancel`` with the same id stops it (the partial download is kept).
    """

    id: GenerationId
    model: ModelName
    source: Annotated[str, Meta(max_length=4096)] | None = None
    sha256: Annotated[str, Meta(pattern=r"^(sha256:)?[0-9a-f]{64}(?!\n)$")] | None = None


ClientMessage = (
    Hello
    | Generate
    | Chat
    | Cancel
    | Credit
    | Ack
    | Forget
    | Heartbeat
    | Pull
    | Listen
    | Audio
    | Speak
    | Draw
    | Watch
)


# -- server -> client -------------------------------------------------------------------


class Limits(msgspec.Struct, omit_defaults=True):
    max_frame_bytes: int
    max_concurrent_generations: int
    max_prompt_tokens: int
    heartbeat_interval: float


class Ready(_ServerBase, tag="ready"):
    """The session is open: ``resume_token`` (when the server keeps sessions over a
    dropped connection) resumes it within ``resume_window`` seconds; ``resumed``
    says this ready continues an earlier connection's session."""

    protocol: int
    server: str
    version: str
    session: str
    user: str
    models: list[str]
    limits: Limits
    flow_control: bool = False
    resume_token: str | None = None
    resume_window: float = 0.0
    resumed: bool = False
    # On a resumed ready: the generation ids the session knows (running, or with
    # messages to send again). A start the client sent that is not listed never
    # arrived: the client sends it again.
    generations: list[str] | None = None


class Queued(_ServerBase, tag="queued"):
    """Generation ``id`` waits for room on its model: ``position`` requests start before it.

    Sent when a request has to wait and again whenever its position changes;
    ``started`` follows when it begins. ``wait_s`` estimates the wait from how
    fast requests have been starting (absent until that is known).
    """

    id: str
    position: int
    wait_s: float | None = None
    n: int | None = None  # the message's number in the session (resume)


class Started(_ServerBase, tag="started"):
    id: str
    model: str
    conversation: str | None = None
    n: int | None = None  # the message's number in the session (resume)


class Delta(_ServerBase, tag="delta"):
    """New text of generation ``id``; ``seq`` counts this generation's deltas from 0."""

    id: str
    seq: int
    text: str
    token_ids: list[int] | None = None
    logprobs: list[Logprob] | None = None  # with options.logprobs: one per token of this delta
    n: int | None = None  # the message's number in the session (resume)


class ToolCallEvent(_ServerBase, tag="tool_call"):
    """A call the model made, once complete: ``arguments`` is JSON text matching the
    tool's schema. ``index`` counts the generation's calls from 0. The generation
    ends with ``finish_reason: "tool_calls"``; answer with ``tool`` turns."""

    id: str
    index: int
    call_id: str
    name: str
    arguments: str
    n: int | None = None  # the message's number in the session (resume)


class TopLogprob(msgspec.Struct):
    token: str  # the token's text (bytes that are not whole UTF-8 characters replaced)
    logprob: float
    bytes: list[int]


class Logprob(msgspec.Struct):
    """A generated token's log-probability under the model, with the likeliest others."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class Usage(msgspec.Struct):
    """Token counts. ``cached_tokens``: prompt tokens whose keys and values were
    reused from an earlier sequence instead of being read (0 when absent)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class Timings(msgspec.Struct):
    load_ms: float
    queue_ms: float
    ttft_ms: float
    total_ms: float
    decode_tok_s: float


class Done(_ServerBase, tag="done"):
    """Last message of a generation. ``finish_reason``: stop, length, cancelled, stalled, error."""

    id: str
    finish_reason: str
    usage: Usage
    timings: Timings
    conversation: str | None = None
    n: int | None = None  # the message's number in the session (resume)


class Error(_ServerBase, tag="error"):
    """A request or message failed; ``id`` names the generation when there is one."""

    code: ErrorCode
    message: str
    id: str | None = None
    retryable: bool = False
    retry_after: float | None = None  # seconds until a retry can succeed (rate_limited)
    n: int | None = None  # the message's number in the session (resume)


class Restarted(_ServerBase, tag="restarted"):
    """Generation ``id`` starts again from its request: what it sent so far is void.

    Sent on a resumed session when the node that ran the generation stopped
    (a deployment sharing sessions between nodes): the node that took the
    session over runs the request again. ``started``, deltas from ``seq`` 0
    and ``done`` follow as for a new generation; a client drops the text it
    had of ``id``.
    """

    id: str
    reason: str
    n: int | None = None  # the message's number in the session (resume)


class ServerHeartbeat(_ServerBase, tag="heartbeat"):
    ts: float


class Progress(_ServerBase, tag="progress"):
    """A step of pull ``id`` (statuses as in Ollama's pull stream; the last is ``success``)."""

    id: str
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
    n: int | None = None  # the message's number in the session (resume)


ServerMessage = (
    Ready
    | Queued
    | Started
    | Delta
    | ToolCallEvent
    | Done
    | Error
    | Restarted
    | ServerHeartbeat
    | Progress
    | SpeechEdge
    | TranscriptEvent
    | AudioOut
    | ImageOut
    | VideoEvent
)

CLIENT_MESSAGES: tuple[type[msgspec.Struct], ...] = (
    Hello,
    Generate,
    Chat,
    Cancel,
    Credit,
    Ack,
    Forget,
    Heartbeat,
    Pull,
    Listen,
    Audio,
    Speak,
    Draw,
    Watch,
)
SERVER_MESSAGES: tuple[type[msgspec.Struct], ...] = (
    Ready,
    Queued,
    Started,
    Delta,
    ToolCallEvent,
    Done,
    Error,
    Restarted,
    ServerHeartbeat,
    Progress,
    SpeechEdge,
    TranscriptEvent,
    AudioOut,
    ImageOut,
    VideoEvent,
)
