"""Logging set-up: one handler, text or JSON lines, each record tagged with its session and request.

The gateway serves many sessions in one event loop, so a log line is only
useful if it says which session and which request it belongs to. Rather than
passing ids to every ``log.info`` call, the handler reads them from two
context variables that :func:`bind` sets around a session or a generation;
asyncio copies the context into each task, so records emitted anywhere below
(engine client, codec, auth) carry the ids of the request being handled.

``ferrous.*`` loggers log at the configured level; everything else
(uvicorn, websockets) at warning, through the same handler and format.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TextIO

__all__ = [
    "ClientFaultFilter",
    "JsonFormatter",
    "bind",
    "configure_logging",
    "request_id",
    "session_id",
]

session_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ferrous_session_id", default=None
)
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ferrous_request_id", default=None
)

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("text", "json")
ROOT_LOGGER = "ferrous"
THIRD_PARTY_LEVEL = logging.WARNING

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "session", "request", "context", "taskName"}
)


@contextlib.contextmanager
def bind(session: str | None = None, request: str | None = None) -> Iterator[None]:
    """Tag records emitted inside the block with ``session`` and ``request``.

    An argument left as None keeps the enclosing value, so a generation can
    bind its request inside its session's block. Both are restored on exit.
    """
    tokens: list[tuple[contextvars.ContextVar[str | None], contextvars.Token[str | None]]] = []
    if session is not None:
        tokens.append((session_id, session_id.set(session)))
    if request is not None:
        tokens.append((request_id, request_id.set(request)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copy the current session and request ids onto each record (None when unbound)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = session_id.get()
        if not hasattr(record, "request"):
            record.request = request_id.get()
        return True


class ClientFaultFilter(logging.Filter):
    """Log a client's malformed frame as a warning line, not as a server error with a traceback.

    uvicorn's WebSocket protocol logs every text frame that is not UTF-8 with
    ``logger.exception`` before it closes the connection with 1007 as it
    should. That is the client's fault, and any client could fill the log
    with tracebacks; the record is kept, one line at warning.
    """

    MESSAGES = frozenset({"Invalid UTF-8 sequence received from client."})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.MESSAGES:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


# On the logger itself, so every handler (ours, a test's, an embedder's) sees it.
logging.getLogger("uvicorn.error").addFilter(ClientFaultFilter())


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [session=... request=...] message``; the brackets only when bound."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        session = getattr(record, "session", None)
        request = getattr(record, "request", None)
        record.context = (
            "" if session is None and request is None else f" [session={session} request={request}]"
        )
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line.

    Keys: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    ``session``, ``request``; ``exc_info`` and ``stack_info`` when present;
    then each ``extra`` field whose value JSON can encode.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC)
        out: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "session": getattr(record, "session", None),
            "request": getattr(record, "request", None),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key in out:
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            out[key] = value
        return json.dumps(out, ensure_ascii=False, default=str)


class _FerrousHandler(logging.StreamHandler[TextIO]):
    """The handler configure_logging installs (and replaces on the next call)."""


def configure_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send log records to ``stream`` (default stderr) as ``fmt`` ("text" or "json").

    ``ferrous`` loggers log at ``level``; the root logger (uvicorn,
    websockets, anything else) at warning. Calling again replaces the
    previous set-up rather than adding a second handler.
    """
    lvl = LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")

    handler = _FerrousHandler(sys.stderr if stream is None else stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _FerrousHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(THIRD_PARTY_LEVEL)

    # Records from ferrous.* reach the root handler by propagation; the root's
    # own level does not filter propagated records, only their logger's does.
    ferrous = logging.getLogger(ROOT_LOGGER)
    ferrous.setLevel(lvl)
    ferrous.propagate = True
