"""The OpenAI-compatible surface's request bodies, as msgspec types.

Unknown fields are ignored (clients send ``user``, ``metadata``, ``store``…);
the fields read are type- and range-checked on decoding, so a wrong one is a
400 that names it. :mod:`gateway.openai_api` translates them for the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from engine.textstream import MAX_STOP_CHARS
from protocol import messages as m

__all__ = [
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ContentPart",
    "EmbeddingsRequest",
    "FunctionCallBody",
    "FunctionDef",
    "JsonSchemaFormat",
    "KeepAlive",
    "MaxTokens",
    "ModelName",
    "NamedFunction",
    "NamedToolChoice",
    "Penalty",
    "Priority",
    "ResponseFormat",
    "SamplingBody",
    "Stop",
    "StopText",
    "StreamOptions",
    "Temperature",
    "ToolCallBody",
    "ToolDef",
    "TopP",
]


ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
StopText = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Meta(max_length=16)]
Priority = m.Priority
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=1_000_000)]
KeepAlive = float | Annotated[str, Meta(max_length=32)]


class StreamOptions(msgspec.Struct):
    """Streaming options: ``include_usage`` adds a last chunk with the usage."""

    include_usage: bool | None = None


class SamplingBody(msgspec.Struct, kw_only=True):
    """What both generation routes share."""

    model: ModelName
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Extensions (llama.cpp's names), and the model's keep-alive as on the other surfaces.
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    ignore_eos: bool | None = None
    priority: Priority | None = None
    keep_alive: KeepAlive | None = None


class ImageUrl(msgspec.Struct):
    """An image part's picture: a ``data:image/...;base64,`` URL (the server fetches no
    URLs for a chat); ``detail`` is accepted and not used."""

    url: str
    detail: str | None = None


class ContentPart(msgspec.Struct):
    """A part of a message's content: ``text``, or ``image_url`` for a vision model."""

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class FunctionCallBody(msgspec.Struct):
    """A call's function: its name and its arguments as JSON text (as OpenAI sends them)."""

    name: Annotated[str, Meta(min_length=1, max_length=64)]
    arguments: str = "{}"


class ToolCallBody(msgspec.Struct):
    """A call an assistant message made (sent back with the conversation)."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    function: FunctionCallBody
    type: Literal["function"] = "function"


class ChatCompletionMessage(msgspec.Struct):
    """A chat message: role system, developer (as system), user, assistant or tool."""

    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: Annotated[list[ToolCallBody], Meta(max_length=128)] | None = None
    tool_call_id: Annotated[str, Meta(max_length=128)] | None = None
    name: str | None = None
    function_call: Any | None = None


class FunctionDef(msgspec.Struct):
    """A function the model may call; ``parameters`` is a JSON Schema object."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: Annotated[str, Meta(max_length=16_384)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    """``{"type": "function", "function": {"name": ...}}``: call this function."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(msgspec.Struct):
    """The JSON Schema the answer must match (without one: any JSON object)."""

    name: str | None = None
    schema: dict[str, Any] | None = None


class ResponseFormat(msgspec.Struct):
    """Structured output: ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingBody, kw_only=True):
    """A stateless chat: the whole conversation comes with every request."""

    messages: list[ChatCompletionMessage]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: Annotated[list[ToolDef], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None


class CompletionRequest(SamplingBody, kw_only=True):
    """A raw prompt (no chat template); ``max_tokens`` defaults to 16."""

    prompt: str | list[Any]
    max_tokens: MaxTokens | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class EmbeddingsRequest(msgspec.Struct):
    """Texts to embed; vectors are unit length, ``float`` or ``base64`` float32."""

    model: ModelName
    input: str | Annotated[list[Any], Meta(max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    # Extensions: cut inputs longer than the model's context (else a 400), keep-alive.
    truncate: bool = True
    keep_alive: KeepAlive | None = None
    # Extension: images (base64 or data URLs) for an image and text embedding model,
    # their vectors after the inputs' (a data:image URL in ``input`` is an image too).
    images: Annotated[list[str], Meta(max_length=64)] = []
