"""The request bodies of the Ollama-compatible API (:mod:`gateway.ollama`), as msgspec types.

Kept apart from the routes, as :mod:`gateway.openai_types` is for the OpenAI
API: these say what a body may hold (bounded lists, checked ranges, Ollama's
field names), so a malformed body is refused with the path of the bad field
before any work; the routes say what is done with it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from engine import ChatMessage, ToolCall, ToolFunction
from gateway.generation import ToolUse
from protocol import messages as m

__all__ = [
    "ChatBody",
    "ChatTurn",
    "EmbedBody",
    "Format",
    "GenerateBody",
    "KeepAlive",
    "LegacyEmbedBody",
    "OllamaFunction",
    "OllamaFunctionCall",
    "OllamaTool",
    "OllamaToolCall",
    "Options",
]


class Options(msgspec.Struct, omit_defaults=True):
    """Ollama's ``options``; unknown keys are ignored, known ones are type-checked."""

    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    num_predict: int | None = None
    num_ctx: Annotated[int, msgspec.Meta(ge=1)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None


KeepAlive = float | str | None
Format = Literal["json", ""] | dict[str, Any] | None


class GenerateBody(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    raw: bool = False
    format: Format = None
    options: Options | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    images: list[str] | None = None
    suffix: str | None = None
    context: list[int] | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    priority: m.Priority = 0  # this server's scheduling class (capped by the credential)


class OllamaFunctionCall(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    index: int | None = None


class OllamaToolCall(msgspec.Struct):
    function: OllamaFunctionCall
    id: str | None = None


class ChatTurn(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: Annotated[list[OllamaToolCall], msgspec.Meta(max_length=128)] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    def engine_message(self, n: int) -> ChatMessage:
        """This turn for the engine (``n`` numbers calls that came without an id)."""
        calls = None
        if self.tool_calls:
            calls = [
                ToolCall(c.id or f"call_{n}_{i}", c.function.name, json.dumps(c.function.arguments))
                for i, c in enumerate(self.tool_calls)
            ]
        call_id = self.tool_call_id or self.tool_name if self.role == "tool" else None
        return ChatMessage(self.role, self.content, tool_calls=calls, tool_call_id=call_id)


class OllamaFunction(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    parameters: dict[str, Any] | None = None


class OllamaTool(msgspec.Struct):
    function: OllamaFunction
    type: Literal["function"] = "function"


class ChatBody(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: list[ChatTurn] = msgspec.field(default_factory=list)
    format: Format = None
    options: Options | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    tools: Annotated[list[OllamaTool], msgspec.Meta(max_length=128)] | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    priority: m.Priority = 0  # this server's scheduling class (capped by the credential)

    def tool_use(self) -> ToolUse | None:
        """Ollama has no tool choice: with tools the model decides (``auto``)."""
        if not self.tools:
            return None
        return ToolUse(
            [
                ToolFunction(
                    t.function.name,
                    t.function.description,
                    "" if t.function.parameters is None else json.dumps(t.function.parameters),
                )
                for t in self.tools
            ]
        )


class EmbedBody(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    input: str | list[str] = ""
    # Images (base64 or data URLs) for an image and text embedding model, embedded
    # after ``input``; a data:image URL in ``input`` is an image too.
    images: Annotated[list[str], msgspec.Meta(max_length=64)] = []
    truncate: bool | None = None
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: KeepAlive = None


class LegacyEmbedBody(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    prompt: str = ""
    options: Options | None = None
    keep_alive: KeepAlive = None
