"""The request body of OpenAI's Responses API, and its ``input`` and ``tools`` in engine terms.

Kept apart from :mod:`gateway.responses_api` (the routes, the stored
responses and the event stream), as :mod:`gateway.openai_types` is from the
chat and completions routes: the body is decoded and checked here, and each
refusal names the parameter it concerns.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from engine import ChatMessage, ToolCall, ToolFunction
from gateway.generation import ToolUse
from gateway.openai_requests import tool_use_from
from gateway.openai_wire import InvalidParam
from protocol import messages as m

__all__ = [
    "FunctionTool",
    "InputItem",
    "InputPart",
    "NamedFunction",
    "ResponsesRequest",
    "input_messages",
    "tool_use_of",
]


class InputPart(msgspec.Struct):
    """A part of an input message: ``input_text`` / ``output_text`` (text only here)."""

    type: str
    text: str | None = None


class InputItem(msgspec.Struct):
    """A message (``role`` + ``content``), a ``function_call``, or a ``function_call_output``."""

    type: str | None = None
    role: str | None = None
    content: str | list[InputPart] | None = None
    call_id: Annotated[str, Meta(max_length=128)] | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None
    id: str | None = None
    status: str | None = None


class FunctionTool(msgspec.Struct):
    """A tool of the Responses API: functions only (``{"type": "function", "name", ...}``)."""

    type: str
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = "f"
    description: Annotated[str, Meta(max_length=16_384)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(msgspec.Struct):
    type: Literal["function"]
    name: str


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    input: str | Annotated[list[InputItem], Meta(max_length=1024)]
    instructions: Annotated[str, Meta(max_length=1_000_000)] | None = None
    previous_response_id: Annotated[str, Meta(max_length=128)] | None = None
    tools: Annotated[list[FunctionTool], Meta(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    metadata: dict[str, str] | None = None
    # Extensions, as on chat completions.
    seed: int | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    priority: m.Priority | None = None
    keep_alive: float | Annotated[str, Meta(max_length=32)] | None = None


def _text(content: str | list[InputPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise InvalidParam(where, f"content parts of type {part.type!r} are not supported")
        texts.append(part.text)
    return "\n".join(texts)


def input_messages(items: str | list[InputItem]) -> list[ChatMessage]:
    """The request's ``input`` as chat turns (calls join the assistant turn before them)."""
    if isinstance(items, str):
        return [ChatMessage("user", items)]
    out: list[ChatMessage] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.type or ("message" if item.role is not None else None)
        if kind == "message":
            role = "system" if item.role == "developer" else item.role
            if role not in ("system", "user", "assistant"):
                raise InvalidParam(f"{where}.role", f"unknown role {item.role!r}")
            out.append(ChatMessage(role, _text(item.content, f"{where}.content")))
        elif kind == "function_call":
            if not item.call_id or not item.name:
                raise InvalidParam(where, "a function_call item needs call_id and name")
            call = ToolCall(item.call_id, item.name, item.arguments or "{}")
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":
                out[-1] = ChatMessage(
                    "assistant", last.content, tool_calls=[*(last.tool_calls or []), call]
                )
            else:
                out.append(ChatMessage("assistant", "", tool_calls=[call]))
        elif kind == "function_call_output":
            if not item.call_id:
                raise InvalidParam(f"{where}.call_id", "a function_call_output needs call_id")
            out.append(ChatMessage("tool", item.output or "", tool_call_id=item.call_id))
        else:
            raise InvalidParam(
                f"{where}.type", f"input items of type {item.type!r} are not supported"
            )
    return out


def tool_use_of(body: ResponsesRequest) -> ToolUse | None:
    choice = body.tool_choice
    tools = []
    for i, t in enumerate(body.tools or ()):
        if t.type != "function":
            raise InvalidParam(f"tools[{i}].type", f"tools of type {t.type!r} are not supported")
        params = "" if t.parameters is None else json.dumps(t.parameters)
        tools.append(ToolFunction(t.name, t.description or "", params))
    named = choice.name if isinstance(choice, NamedFunction) else None
    mode = None if isinstance(choice, NamedFunction) else choice
    return tool_use_from(tools, mode, named, body.parallel_tool_calls is not False)
