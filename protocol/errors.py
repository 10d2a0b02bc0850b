"""Error codes and the one exception root shared by every FerrousForge package.

Every failure a client can observe carries one code from a fixed set, so each
surface (WebSocket error message, HTTP status + JSON body) maps codes to its own
shape without guessing::

    FerrousError                 root; ``code`` is an :class:`ErrorCode`
    ├── BadRequest               bad_request
    ├── ModelNotFound            model_not_found
    ├── Cancelled                cancelled
    ├── Stalled                  stalled
    ├── Overloaded               overloaded
    ├── RateLimited              rate_limited
    ├── TooLarge                 too_large
    ├── Conflict                 conflict
    ├── NotFound                 not_found
    ├── Forbidden                forbidden
    ├── ResumeExpired            resume_expired
    └── EngineError              engine_error (worker died, backend failed)
        └── ModelLoadError       engine_error, names the file and the reason

This module is pure: no I/O, no asyncio.
"""

from __future__ import annotations

import enum

__all__ = [
    "ERRORS_BY_CODE",
    "BadRequest",
    "Cancelled",
    "Conflict",
    "EngineError",
    "ErrorCode",
    "FerrousError",
    "Forbidden",
    "ModelLoadError",
    "ModelNotFound",
    "NotFound",
    "Overloaded",
    "RateLimited",
    "ResumeExpired",
    "Stalled",
    "TooLarge",
    "error_from_code",
]


class ErrorCode(enum.StrEnum):
    """The fixed set of error codes. Adding one is a protocol change."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    CANCELLED = "cancelled"
    STALLED = "stalled"
    ENGINE_ERROR = "engine_error"
    RESUME_EXPIRED = "resume_expired"
    INTERNAL = "internal"


class FerrousError(Exception):
    """Root of every error FerrousForge raises on purpose.

    ``retryable`` tells a client whether the same request may succeed later
    (a crashed worker is replaced; a malformed request stays malformed).
    """

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False
    retry_after: float | None = None
    """Seconds after which a retry can succeed, when known (quotas, full queues)."""

    def __init__(
        self, message: str, *, retryable: bool | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable
        if retry_after is not None:
            self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value}: {self.message!r})"


class BadRequest(FerrousError):
    code = ErrorCode.BAD_REQUEST


class ModelNotFound(FerrousError):
    code = ErrorCode.MODEL_NOT_FOUND


class Cancelled(FerrousError):
    code = ErrorCode.CANCELLED


class Stalled(FerrousError):
    code = ErrorCode.STALLED


class TooLarge(FerrousError):
    code = ErrorCode.TOO_LARGE


class Conflict(FerrousError):
    code = ErrorCode.CONFLICT


class NotFound(FerrousError):
    code = ErrorCode.NOT_FOUND


class Forbidden(FerrousError):
    code = ErrorCode.FORBIDDEN


class ResumeExpired(FerrousError):
    """A session could not be resumed: its window passed, or the messages after the
    client's ``last`` are no longer kept. The client starts over (a new session)."""

    code = ErrorCode.RESUME_EXPIRED


class RateLimited(FerrousError):
    code = ErrorCode.RATE_LIMITED
    retryable = True


class Overloaded(FerrousError):
    code = ErrorCode.OVERLOADED
    retryable = True


class EngineError(FerrousError):
    code = ErrorCode.ENGINE_ERROR


class ModelLoadError(EngineError):
    """A model file could not be loaded: ``path`` and ``reason`` say which and why.

    ``reason`` is a short machine-readable word (``missing``, ``not_gguf``,
    ``truncated``, ``unsupported_architecture``, ``corrupt``, ``backend``).
    """

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"cannot load {path}: {reason}: {detail}")
        if reason == "missing":
            self.code = ErrorCode.MODEL_NOT_FOUND
        self.path = path
        self.reason = reason
        self.detail = detail


ERRORS_BY_CODE: dict[ErrorCode, type[FerrousError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.MODEL_NOT_FOUND: ModelNotFound,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.STALLED: Stalled,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.ENGINE_ERROR: EngineError,
    ErrorCode.RESUME_EXPIRED: ResumeExpired,
}


def error_from_code(code: str, message: str, *, retryable: bool = False) -> FerrousError:
    """Rebuild an exception from its wire form (code + message)."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        ec = ErrorCode.INTERNAL
    cls = ERRORS_BY_CODE.get(ec, FerrousError)
    err = cls(message, retryable=retryable)
    if cls is FerrousError:
        err.code = ec
    return err
