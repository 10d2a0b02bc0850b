"""OpenAI request bodies in the engine's terms: messages (with their image parts),
sampling options, tools, response formats, prompts and embedding inputs.

Every refusal is an :class:`~gateway.openai_wire.InvalidParam` naming the
parameter, so the OpenAI clients show which field was wrong; the routes
(:mod:`gateway.openai_api`) only decide what to run and how to answer.
"""

from __future__ import annotations

import json
from typing import Literal

from engine import ChatMessage, ToolCall, ToolFunction
from engine.images import decode_image, embedding_input
from gateway.generation import MAX_SAMPLES, ToolUse, format_options
from gateway.openai_types import (
    ChatCompletionMessage,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    NamedToolChoice,
    SamplingBody,
)
from gateway.openai_wire import InvalidParam
from protocol import messages as m
from protocol.durations import parse_duration
from protocol.errors import BadRequest, FerrousError

__all__ = [
    "chat_messages",
    "completion_prompt",
    "embedding_inputs",
    "keep_alive_of",
    "refuse_chat_extras",
    "refuse_completion_extras",
    "response_format",
    "sampling_options",
    "tool_use",
    "tool_use_from",
]


def sampling_options(
    body: SamplingBody, max_tokens: int | None, logprobs: int | None = None
) -> m.Options:
    if body.n is not None and not 1 <= body.n <= MAX_SAMPLES:
        raise InvalidParam("n", f"n must be between 1 and {MAX_SAMPLES}")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return m.Options(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        seed=None if body.seed is None else body.seed % 2**32,
        max_tokens=max_tokens,
        stop=stop,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def keep_alive_of(body: SamplingBody | EmbeddingsRequest) -> float | None:
    if body.keep_alive is None:
        return None
    try:
        return parse_duration(body.keep_alive)
    except BadRequest as exc:
        raise InvalidParam("keep_alive", exc.message) from None


def chat_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    if not body.messages:
        raise InvalidParam("messages", "messages must hold at least one message")
    out: list[ChatMessage] = []
    for i, msg in enumerate(body.messages):
        where = f"messages[{i}]"
        role = "system" if msg.role == "developer" else msg.role
        if role == "function" or msg.function_call is not None:
            raise InvalidParam(
                f"{where}.role", "the legacy function-calling fields are not supported: use tools"
            )
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidParam(
                f"{where}.role", f"unknown role {msg.role!r}: use system, user, assistant or tool"
            )
        if role == "tool":
            if not msg.tool_call_id:
                raise InvalidParam(f"{where}.tool_call_id", "a tool message needs tool_call_id")
            out.append(ChatMessage("tool", _content(msg, where), tool_call_id=msg.tool_call_id))
            continue
        calls = None
        if msg.tool_calls:
            if role != "assistant":
                raise InvalidParam(f"{where}.tool_calls", "only assistant messages make calls")
            calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls]
        text, images = _parts(msg, where)
        if images and role != "user":
            raise InvalidParam(f"{where}.content", "only user messages show images")
        out.append(ChatMessage(role, text, tool_calls=calls, images=images or None))
    return out


def tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's tools and tool choice, for the engine (None: no tools)."""
    choice = body.tool_choice
    tools = [
        ToolFunction(
            t.function.name,
            t.function.description or "",
            json.dumps(t.function.parameters) if t.function.parameters is not None else "",
        )
        for t in body.tools or ()
    ]
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    mode = None if isinstance(choice, NamedToolChoice) else choice
    return tool_use_from(tools, mode, named, body.parallel_tool_calls is not False)


def tool_use_from(
    tools: list[ToolFunction],
    mode: Literal["auto", "required", "none"] | None,
    named: str | None,
    parallel: bool,
) -> ToolUse | None:
    """Tools and a tool choice as either OpenAI API spells them, checked, for the
    engine (None: no tools). ``mode`` is the choice when it is a word, ``named``
    the tool it names when it names one."""
    if not tools:
        if named is not None or mode == "required":
            raise InvalidParam("tool_choice", "tool_choice needs tools")
        return None
    if named is not None and named not in {t.name for t in tools}:
        raise InvalidParam("tool_choice", f"no tool is named {named!r}")
    return ToolUse(tools, mode or "auto", named, parallel)


def _content(msg: ChatCompletionMessage, where: str) -> str:
    return _parts(msg, where)[0]


def _parts(msg: ChatCompletionMessage, where: str) -> tuple[str, list[bytes]]:
    """A message's text, and the images of its ``image_url`` parts (decoded, unchecked)."""
    if isinstance(msg.content, str):
        return msg.content, []
    if msg.content is None:
        if msg.role == "assistant":
            return "", []
        raise InvalidParam(f"{where}.content", "content is required")
    texts: list[str] = []
    images: list[bytes] = []
    for k, part in enumerate(msg.content):
        if part.type == "image_url" and part.image_url is not None:
            url = part.image_url.url
            if not url.startswith("data:image/"):
                raise InvalidParam(
                    f"{where}.content[{k}].image_url",
                    "an image must be sent as a data:image/...;base64, URL",
                )
            try:
                images.append(decode_image(url))
            except FerrousError as exc:
                raise InvalidParam(f"{where}.content[{k}].image_url", exc.message) from None
        elif part.type == "text" and part.text is not None:
            texts.append(part.text)
        else:
            raise InvalidParam(
                f"{where}.content", f"content parts of type {part.type!r} are not supported"
            )
    return "\n".join(texts), images


def response_format(body: ChatCompletionRequest) -> dict[str, object]:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object" or fmt.json_schema is None or fmt.json_schema.schema is None:
        return format_options("json")
    return format_options(fmt.json_schema.schema)


def refuse_chat_extras(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParam("top_logprobs", "top_logprobs needs logprobs: true")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise InvalidParam("top_logprobs", "top_logprobs must be between 0 and 20")
    if body.functions:
        raise InvalidParam("functions", "the legacy functions field is not supported: use tools")
    if body.tools and body.response_format is not None and body.response_format.type != "text":
        raise InvalidParam("response_format", "tools cannot be combined with response_format")


def completion_prompt(body: CompletionRequest) -> str:
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(x, str) for x in prompt):
        raise InvalidParam("prompt", "send one prompt per request (a batch is not supported)")
    raise InvalidParam("prompt", "prompt must be a string (token arrays are not supported)")


def refuse_completion_extras(body: CompletionRequest) -> None:
    if body.suffix:
        raise InvalidParam("suffix", "suffix (fill-in-the-middle) is not supported")
    if body.best_of is not None and body.best_of != 1:
        raise InvalidParam("best_of", "only best_of=1 is supported")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise InvalidParam("logprobs", "logprobs must be between 0 and 5")


def embedding_inputs(body: EmbeddingsRequest) -> list[str | bytes]:
    """The inputs in order: texts, and images (``data:image/...`` URLs in ``input``, then
    the ``images`` extension's base64 or data URLs) as their bytes."""
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs and not body.images:
        raise InvalidParam("input", "input must not be empty")
    for x in inputs:
        if not isinstance(x, str):
            raise InvalidParam("input", "input must be text (token arrays are not supported)")
        if not x:
            raise InvalidParam("input", "input must not hold empty strings")
    return [embedding_input(x) for x in inputs if isinstance(x, str)] + [
        decode_image(x) for x in body.images
    ]
