"""How the OpenAI-compatible surfaces answer: errors, JSON and SSE framing, and the
pieces of a response (finish reasons, usage, log-probabilities, tool calls).

Shared by chat/completions (:mod:`gateway.openai_api`) and the Responses API
(:mod:`gateway.responses_api`), so both speak OpenAI's shapes the same way.
"""

from __future__ import annotations

import msgspec
from starlette.responses import Response

from engine import FinishReason, GenerationDone
from engine.logprobs import TokenLogprob
from gateway.generation import logprob_json, raise_if_failed
from gateway.http_common import error_field, http_status
from gateway.toolcalls import CallArguments, CallStarted, ToolCallReader
from protocol.errors import BadRequest, ErrorCode, FerrousError

__all__ = [
    "DONE",
    "InvalidParam",
    "chat_logprobs",
    "error_json",
    "finish_reason",
    "json_response",
    "legacy_logprobs",
    "openai_error",
    "sse",
    "tool_calls_json",
    "tool_delta",
    "usage_json",
]


class InvalidParam(BadRequest):
    """A 400 that names the offending request parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def _param(exc: FerrousError) -> str | None:
    field = error_field(exc)
    if field is None and exc.code is ErrorCode.MODEL_NOT_FOUND:
        field = "model"
    return field


def error_json(exc: FerrousError) -> dict[str, object]:
    status = http_status(exc)
    return {
        "error": {
            "message": exc.message,
            "type": _TYPES.get(status, "server_error"),
            "param": _param(exc),
            "code": exc.code.value,
        }
    }


def openai_error(exc: FerrousError) -> Response:
    """``exc`` as an OpenAI error response."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.code is ErrorCode.UNAUTHORIZED else None
    return json_response(error_json(exc), status=http_status(exc), headers=headers)


def json_response(
    body: object, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        msgspec.json.encode(body),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def sse(body: object) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, object] | None:
    """A choice's ``logprobs`` on chat completions (``content``: one entry per token)."""
    if lps is None:
        return None
    return {"content": [logprob_json(lp) for lp in lps], "refusal": None}


def legacy_logprobs(lps: list[TokenLogprob] | None, offset: int) -> dict[str, object] | None:
    """A choice's ``logprobs`` on the legacy completions API (parallel lists)."""
    if lps is None:
        return None
    tokens = [lp.piece.decode("utf-8", "replace") for lp in lps]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [
            {t.piece.decode("utf-8", "replace"): t.logprob for t in lp.top} for lp in lps
        ],
        "text_offset": offsets,
    }


def finish_reason(done: GenerationDone, reader: ToolCallReader | None = None) -> str:
    """OpenAI's finish_reason, or raise the error the generation ended with."""
    raise_if_failed(done)
    if done.finish_reason is FinishReason.LENGTH:
        return "length"
    return "tool_calls" if reader is not None and reader.calls else "stop"


def tool_calls_json(reader: ToolCallReader) -> list[dict[str, object]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in reader.calls
    ]


def tool_delta(ev: CallStarted | CallArguments) -> dict[str, object]:
    """A streamed ``delta`` for a piece of a call: its id and name first, then arguments."""
    if isinstance(ev, CallStarted):
        call: dict[str, object] = {
            "index": ev.index,
            "id": ev.id,
            "type": "function",
            "function": {"name": ev.name, "arguments": ""},
        }
    else:
        call = {"index": ev.index, "function": {"arguments": ev.text}}
    return {"tool_calls": [call]}


def usage_json(done: GenerationDone, *more: GenerationDone) -> dict[str, object]:
    """Usage of a generation, or of several samples of one prompt (counted once)."""
    u = done.usage
    completion = u.completion_tokens + sum(d.usage.completion_tokens for d in more)
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": u.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }
