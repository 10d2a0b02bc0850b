"""Opening a session: what the client offers, and what a refusal or a failure means.

Both clients (async and sync) open a connection the same way: credentials in
a header (``Authorization: Bearer`` for a token, ``X-API-Key`` for a key) or a
single-use ``?ticket=``, one protocol subprotocol offered, then ``hello`` and
the server's ``ready``. A server that refuses answers the HTTP upgrade with a
status and a JSON body ``{"error": {"code", "message", "retryable"}}`` and
never upgrades; this module turns that, and every transport failure, into the
client's exceptions. Pure: no sockets here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ferrous_client.errors import (
    BadRequest,
    ConnectionLost,
    FerrousClientError,
    Forbidden,
    InternalError,
    NotFound,
    Overloaded,
    RateLimited,
    Unauthorized,
    error_from_code,
)
from ferrous_client.protocol import messages as m
from ferrous_client.protocol.codec import Codec, codec_for
from ferrous_client.wire import decode_server, error_from_message

__all__ = [
    "CLIENT_NAME",
    "VERSION",
    "Handshake",
    "denial_error",
    "first_ready",
    "ready_or_refusal",
    "subprotocol_name",
    "transport_error",
]

VERSION = "0.1.0"
CLIENT_NAME = f"ferrous-client/{VERSION}"

_SHORT_NAMES = {"json": m.SUBPROTOCOL_JSON, "msgpack": m.SUBPROTOCOL_MSGPACK}


def subprotocol_name(name: str) -> str:
    """``json``/``msgpack`` or a full name (``ferrous.v1.json``) -> the full name."""
    full = _SHORT_NAMES.get(name, name)
    if full not in _SHORT_NAMES.values():
        raise ValueError(f"unknown subprotocol {name!r}: use 'json' or 'msgpack'")
    return full


@dataclass(frozen=True)
class Handshake:
    """Everything the client sends to open a session (URL, headers, subprotocol, hello)."""

    url: str
    headers: dict[str, str]
    subprotocol: str
    credits: int | None

    @classmethod
    def build(
        cls,
        url: str,
        *,
        token: str | None,
        api_key: str | None,
        ticket: str | None,
        subprotocol: str,
        credits: int | None,
    ) -> Handshake:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"not a WebSocket URL: {url!r} (use ws:// or wss://)")
        if credits is not None and credits < 1:
            raise ValueError("credits must be at least 1 byte (or None for no flow control)")
        headers: dict[str, str] = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if api_key:
            headers["X-API-Key"] = api_key
        if ticket:
            query = [(k, v) for k, v in parse_qsl(parts.query) if k != "ticket"]
            query.append(("ticket", ticket))
            url = urlunsplit(parts._replace(query=urlencode(query)))
        return cls(url, headers, subprotocol_name(subprotocol), credits)

    @property
    def codec(self) -> Codec:
        return codec_for(self.subprotocol)

    def hello(self) -> m.Hello:
        return m.Hello(client=CLIENT_NAME, credits=self.credits)


_BY_STATUS: dict[int, type[FerrousClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    429: RateLimited,
    503: Overloaded,
}
# These statuses say "try again later" whatever the body says (RFC 9110 section 15.6).
_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


def denial_error(status: int, body: bytes | None) -> FerrousClientError:
    """The exception for an HTTP refusal of the upgrade (status + JSON error body)."""
    retryable = status in _RETRYABLE_STATUS
    try:
        data: Any = json.loads(body or b"")
        err: Mapping[str, Any] = data["error"]
        code, message = str(err["code"]), str(err["message"])
        retryable = retryable or err.get("retryable") is True
    except (ValueError, KeyError, TypeError):
        cls = _BY_STATUS.get(status, InternalError)
        text = (body or b"").decode("utf-8", "replace").strip()[:200]
        return cls(f"HTTP {status} {text}".rstrip(), retryable=retryable)
    return error_from_code(code, message, retryable=retryable)


def transport_error(exc: BaseException) -> FerrousClientError:
    """Any failure while opening or using a connection -> the client's exception."""
    if isinstance(exc, FerrousClientError):
        return exc
    if isinstance(exc, InvalidStatus):
        return denial_error(exc.response.status_code, bytes(exc.response.body or b""))
    if isinstance(exc, ConnectionClosed):
        rcvd = exc.rcvd
        if rcvd is None:
            return ConnectionLost("the connection closed without a close frame")
        reason = f" ({rcvd.reason})" if rcvd.reason else ""
        return ConnectionLost(
            f"the server closed the connection: {rcvd.code}{reason}",
            close_code=rcvd.code,
            close_reason=rcvd.reason,
        )
    if isinstance(exc, InvalidHandshake | OSError | TimeoutError | EOFError):
        detail = str(exc) or type(exc).__name__
        return ConnectionLost(f"cannot connect: {detail}")
    return ConnectionLost(f"connection failed: {type(exc).__name__}: {exc}")


def ready_or_refusal(
    codec: Codec, data: bytes | str, refusals: list[FerrousClientError] | None
) -> m.Ready | None:
    """:func:`first_ready`, except that with ``refusals`` an error is kept there
    instead of raised: a refused resume is followed by a new session's ready."""
    try:
        return first_ready(codec, data)
    except FerrousClientError as exc:
        if refusals is None:
            raise
        refusals.append(exc)
        return None


def first_ready(codec: Codec, data: bytes | str) -> m.Ready | None:
    """Check one frame received after ``hello``: Ready, an error to raise, or None to skip."""
    msg = decode_server(codec, data)
    match msg:
        case m.Ready():
            return msg
        case m.Error():
            raise error_from_message(msg)
        case _:
            return None
