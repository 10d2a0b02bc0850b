"""Which web pages may drive the server, and under which host names it answers.

A server on loopback is reachable from every page the machine's browser
opens. Three browser attacks matter, and each has its defence here:

- **Cross-site requests.** A page on ``https://evil.example`` posts to
  ``http://127.0.0.1:11480/api/pull``. Browsers send ``Origin`` on every
  cross-origin request, on every POST and on every WebSocket handshake, so an
  ``Origin`` outside the allow-list is refused (403) on every route before
  anything else runs. Allowed: the server's own origin, loopback origins on
  any port (``localhost``, ``*.localhost``, ``127.0.0.1``, ``[::1]``, as
  Ollama's default ``OLLAMA_ORIGINS`` does), and ``[browser] origins``.
- **Simple requests.** A cross-origin ``text/plain`` or form POST needs no CORS
  preflight, so it reaches the route even when the page cannot read the
  answer. JSON routes therefore refuse the CORS-safelisted content types from
  a browser (:func:`json_body_refusal`).
- **DNS rebinding.** ``evil.example`` resolves to 127.0.0.1 after the page
  loaded, and the page's requests are then same-origin for the browser. They
  still carry ``Host: evil.example``: only loopback names, IP literals (a
  rebinding needs a name), the bound host, this machine's name and
  ``[browser] hosts`` are served.

CORS preflights from allowed origins are answered here; allowed cross-origin
responses carry ``Access-Control-Allow-Origin`` with ``Vary: Origin``.

The decisions are pure functions; :class:`BrowserGuard` is the ASGI layer
that applies them to every HTTP request and WebSocket handshake.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "BrowserGuard",
    "BrowserPolicy",
    "host_allowed",
    "json_body_refusal",
    "origin_allowed",
    "split_host",
]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# Content types a page may send cross-origin without a preflight (Fetch, CORS-safelisted).
_SIMPLE_TYPES = frozenset(
    {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)
_PREFLIGHT_MAX_AGE = "600"
_ALLOWED_METHODS = "GET, POST, DELETE, HEAD, OPTIONS"
_ALLOWED_HEADERS = "authorization, content-type, x-api-key, x-request-id, last-event-id"


def split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` of a Host header (or a URL's netloc) as (lower-case host, port).

    IPv6 literals keep no brackets. None for text that is not a host.
    """
    text = value.strip().lower()
    if not text or any(c in text for c in "/@ \t\\"):
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            host, port_text = text, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port: int | None = int(port_text)
    else:
        port = None
    host = host.rstrip(".")
    return (host, port) if host else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback_name(host: str) -> bool:
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _name_matches(host: str, pattern: str) -> bool:
    """``pattern`` is a name, ``.example`` (it and its subdomains) or ``*.example``."""
    pattern = pattern.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        pattern = pattern[1:]
    if pattern.startswith("."):
        return host == pattern[1:] or host.endswith(pattern)
    return host == pattern


class BrowserPolicy:
    """The allow-lists of one server: which origins and Host names it accepts."""

    def __init__(
        self,
        *,
        origins: Sequence[str] = (),
        hosts: Sequence[str] = (),
        bound_host: str = "127.0.0.1",
        machine_names: Iterable[str] | None = None,
    ) -> None:
        self.any_origin = "*" in origins
        self.origins = [o.strip().lower().rstrip("/") for o in origins if o.strip() != "*"]
        self.any_host = "*" in hosts
        names = {bound_host.strip().lower().strip("[]")}
        if machine_names is None:
            machine = socket.gethostname().lower()
            machine_names = (machine, machine.split(".")[0], f"{machine.split('.')[0]}.local")
        names.update(n.lower() for n in machine_names if n)
        self.hosts = [*names, *(h for h in hosts if h.strip() != "*")]


def host_allowed(policy: BrowserPolicy, host_header: str | None) -> bool:
    """Whether a request naming ``host_header`` may be served (DNS-rebinding defence).

    A request without a Host header (HTTP/1.0, raw sockets) did not come
    from a browser and is served.
    """
    if host_header is None or policy.any_host:
        return True
    parsed = split_host(host_header)
    if parsed is None:
        return False
    host = parsed[0]
    if _is_loopback_name(host) or _is_ip(host):
        return True
    return any(_name_matches(host, pattern) for pattern in policy.hosts)


def origin_allowed(policy: BrowserPolicy, origin: str, host_header: str | None) -> bool:
    """Whether a browser page at ``origin`` may use the server reached as ``host_header``."""
    if policy.any_origin:
        return True
    origin = origin.strip().lower().rstrip("/")
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.path or parts.query:
        return False  # "null" (sandboxed frames, file: pages) and anything odd
    netloc = split_host(parts.netloc)
    if netloc is None:
        return False
    if host_header is not None and split_host(host_header) == netloc:
        return True  # the server's own origin (the chat page)
    if _is_loopback_name(netloc[0]):
        return True
    for allowed in policy.origins:
        want = urlsplit(allowed)
        if want.scheme != parts.scheme:
            continue
        want_host = split_host(want.netloc)
        if want_host is None:
            continue
        if want.netloc.startswith("*."):
            if netloc[0].endswith(want_host[0][1:]) and netloc[1] == want_host[1]:
                return True
        elif want_host == netloc:
            return True
    return False


def json_body_refusal(content_type: str | None, *, from_browser: bool) -> str | None:
    """Why a JSON route refuses this body's content type, or None when it is accepted.

    JSON types (``application/json``, ``*/*+json``) are always accepted. From
    a browser (the request carries ``Origin`` or ``Sec-Fetch-Site``) anything
    else is refused: those are exactly the requests a foreign page can send
    without a preflight. Other clients may omit the type or send curl's
    default form type, so the examples written for Ollama keep working.
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    if from_browser or (media and media not in _SIMPLE_TYPES):
        shown = media or "none"
        return f"this route takes a JSON body: send Content-Type: application/json (got {shown})"
    return None


def _headers(scope: Scope) -> tuple[str | None, str | None, bool]:
    """Host, Origin (the first of each, as Starlette reads them) and whether an
    Access-Control-Request-Method is present: only these, so that no copy of the
    headers lives as long as the connection (a WebSocket's lasts for hours)."""
    host = origin = None
    asks_method = False
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.lower()
        if name == b"host" and host is None:
            host = raw_value.decode("latin-1")
        elif name == b"origin" and origin is None:
            origin = raw_value.decode("latin-1")
        elif name == b"access-control-request-method":
            asks_method = True
    return host, origin, asks_method


def _forbidden(message: str) -> bytes:
    error = {"code": "forbidden", "message": message, "retryable": False}
    return json.dumps({"error": error}).encode()


class BrowserGuard:
    """ASGI middleware: Host and Origin checks, CORS, in front of every route."""

    def __init__(self, app: ASGIApp, policy: BrowserPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host, origin, asks_method = _headers(scope)
        if not host_allowed(self.policy, host):
            await self._deny(scope, receive, send, "this server does not answer to that host name")
            return
        if origin is not None and not origin_allowed(self.policy, origin, host):
            await self._deny(scope, receive, send, "requests from this web origin are not allowed")
            return
        if scope["type"] == "websocket" or origin is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and asks_method:
            await self._preflight(send, origin)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", b"retry-after, x-request-id"),
                    (b"vary", b"Origin"),
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, send: Send, origin: str) -> None:
        headers = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", _ALLOWED_METHODS.encode()),
            (b"access-control-allow-headers", _ALLOWED_HEADERS.encode()),
            (b"access-control-max-age", _PREFLIGHT_MAX_AGE.encode()),
            (b"vary", b"Origin"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _deny(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        body = _forbidden(message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if scope["type"] == "websocket":
            # Refused before the upgrade (ASGI websocket denial response extension).
            await receive()  # websocket.connect
            await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})
