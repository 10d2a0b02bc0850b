"""What every HTTP surface shares: bodies, credentials, errors, streaming and disconnects.

* Bodies are read with a size limit (``limits.max_body_bytes``; 413 beyond it)
  and decoded by msgspec into the surface's request Struct, so a wrong type is
  a 400 whose message names the field (``$.options.temperature``).
* Bodies of JSON routes must say they are JSON when a browser sends them
  (415 otherwise): see :func:`gateway.origins.json_body_refusal`.
* Credentials are the WebSocket's: ``Authorization: Bearer`` (JWT or API key)
  or ``X-API-Key``. The Ollama and OpenAI surfaces let loopback clients in
  without one (``auth.loopback_without_token``, on by default) with
  :data:`gateway.scopes.LOOPBACK_SCOPES`; a request that came through a
  proxy (``Forwarded`` / ``X-Forwarded-For``) never counts as loopback.
* A client that goes away cancels its generation: streaming responses are
  cancelled by the server when the connection drops (their generators close
  the engine iterator), and :func:`unless_disconnected` does the same for
  non-streaming responses, which would otherwise run to the end unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.auth import Principal, Unauthorized
from gateway.origins import json_body_refusal
from gateway.scopes import LOOPBACK_SCOPES
from protocol.errors import BadRequest, Cancelled, ErrorCode, FerrousError, TooLarge

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = [
    "SSE_HEADERS",
    "ClosingStream",
    "error_field",
    "http_status",
    "is_loopback_request",
    "read_body",
    "unless_disconnected",
]

T = TypeVar("T")

log = logging.getLogger("ferrous.http")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.CANCELLED: 499,
    ErrorCode.STALLED: 504,
    ErrorCode.ENGINE_ERROR: 500,
    ErrorCode.RESUME_EXPIRED: 410,
    ErrorCode.INTERNAL: 500,
}
# Store failures caused by the model's source, or by the disk.
_REASON_STATUS = {
    "digest_mismatch": 502,
    "http": 502,
    "network": 502,
    "source": 502,
    "disk_full": 507,
    "media_type": 415,
}
_FIELD = re.compile(r"at `\$\.([A-Za-z0-9_.\[\]]+)`")
_MISSING = re.compile(r"missing required field `([A-Za-z0-9_]+)`")


def http_status(exc: FerrousError) -> int:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason in _REASON_STATUS:
        return _REASON_STATUS[reason]
    return _STATUS.get(exc.code, 500)


def error_field(exc: FerrousError) -> str | None:
    """The request field an error names (``$.options.temperature`` -> ``options.temperature``)."""
    param = getattr(exc, "param", None)
    if isinstance(param, str):
        return param
    match = _FIELD.search(exc.message)
    field = match.group(1) if match else None
    missing = _MISSING.search(exc.message)
    if missing:
        return f"{field}.{missing.group(1)}" if field else missing.group(1)
    return field


class UnsupportedMediaType(BadRequest):
    """A JSON route got a body that does not say it is JSON (HTTP 415)."""

    reason = "media_type"


def _max_body(gateway: Gateway) -> int:
    return gateway.config.limits.max_body_bytes


async def read_body(gateway: Gateway, request: Request, kind: type[T]) -> T:
    """Decode a JSON body into ``kind`` (413 over the limit; 400 naming the field)."""
    headers = request.headers
    from_browser = "origin" in headers or "sec-fetch-site" in headers
    refusal = json_body_refusal(headers.get("content-type"), from_browser=from_browser)
    if refusal is not None:
        raise UnsupportedMediaType(refusal)
    limit = _max_body(gateway)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"the request body ({length} bytes) exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.strip():
        raise BadRequest("the request needs a JSON body")
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except UnicodeError:  # a JSON string holding bytes that are not UTF-8
        raise BadRequest("the request body is not valid JSON: a string is not UTF-8") from None
    except RecursionError:  # free-form fields (a JSON schema) nested absurdly deep
        raise BadRequest("invalid request: the body is nested too deeply") from None


def is_loopback_request(request: Request) -> bool:
    if "forwarded" in request.headers or "x-forwarded-for" in request.headers:
        return False
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_without_token(gateway: Gateway) -> bool:
    """Whether the compatible surfaces let loopback clients in without a credential."""
    auth = gateway.config.auth
    return auth.loopback_without_token or auth.ollama_loopback_without_token


def principal(gateway: Gateway, request: Request, *, allow_loopback: bool = False) -> Principal:
    """Authenticate an HTTP request; raise Unauthorized.

    With ``allow_loopback``, a loopback request whose credential is valid is
    still that credential's principal (its tenant and scopes apply); one
    without a valid credential is the local user. The OpenAI client always
    sends some key (users pass a placeholder), so a key that is not ours does
    not lock a loopback client out.
    """
    try:
        return gateway.http_principal(request)
    except Unauthorized:
        if allow_loopback and is_loopback_request(request):
            return Principal("local", None, "loopback", None, LOOPBACK_SCOPES)
        raise


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``, cancelling it if the client disconnects first (then raise Cancelled)."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher: asyncio.Future[object] = asyncio.ensure_future(watch())
    done_first: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def first(_f: object) -> None:
        if not done_first.done():
            done_first.set_result(None)

    task.add_done_callback(first)
    watcher.add_done_callback(first)
    try:
        await done_first
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, FerrousError):
            await task
        raise Cancelled("the client disconnected")
    return task.result()


class ClosingStream(StreamingResponse):
    """A streaming response whose generator is always closed when the response ends.

    When a client disconnects, Starlette cancels the task sending the body;
    a generator suspended at a ``yield`` is then left for the garbage
    collector, and the generation it drives keeps running until then. Closing
    it here runs its ``finally`` at once, which cancels the generation.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        media_type: str = "text/event-stream",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        base = SSE_HEADERS if media_type == "text/event-stream" else {}
        super().__init__(content, media_type=media_type, headers={**base, **(headers or {})})
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()


ErrorRenderer = Callable[[FerrousError], Response]
RETRY_AFTER_SECONDS = 1
_RETRY_LATER = frozenset({ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED})
Handler = Callable[[Request], Awaitable[Response]]


def post_route(gateway: Gateway, path: str, fn: Handler, render: ErrorRenderer) -> Route:
    """A POST route of a compatible surface: guarded, loopback clients let in when configured."""
    loopback = loopback_without_token(gateway)
    return Route(path, guarded(gateway, render, fn, allow_loopback=loopback), methods=["POST"])


def guarded(
    gateway: Gateway, render: ErrorRenderer, fn: Handler, *, allow_loopback: bool = False
) -> Handler:
    """Authenticate, run ``fn``, and render any FerrousError in the surface's own shape."""

    async def handler(request: Request) -> Response:
        try:
            request.state.principal = principal(gateway, request, allow_loopback=allow_loopback)
            return await fn(request)
        except Unauthorized as exc:
            gateway.metrics.errors.labels(exc.code.value).inc()
            return render(exc)
        except FerrousError as exc:
            gateway.metrics.errors.labels(exc.code.value).inc()
            response = render(exc)
            if exc.code in _RETRY_LATER:
                # Full queues and limits clear in seconds: say when to try again.
                wait = exc.retry_after or RETRY_AFTER_SECONDS
                response.headers.setdefault("Retry-After", str(max(1, math.ceil(wait))))
            return response
        except Exception:
            # A bug, not the client's fault: log it, answer in the surface's shape.
            log.exception("%s %s failed", request.method, request.url.path)
            gateway.metrics.errors.labels(ErrorCode.INTERNAL.value).inc()
            return render(FerrousError("internal error (logged on the server)"))

    return handler
