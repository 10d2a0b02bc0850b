"""Exceptions the client raises: one class per protocol error code, plus ConnectionLost.

A server error names one :class:`~ferrous_client.protocol.errors.ErrorCode`;
the client raises the class for that code, so callers catch what they can
handle (``except RateLimited``) instead of comparing strings::

    FerrousClientError           root: code, message, generation_id, retryable
    ├── BadRequest               bad_request
    ├── Unauthorized             unauthorized (handshake or an expired token)
    ├── Forbidden                forbidden
    ├── NotFound                 not_found
    ├── ModelNotFound            model_not_found
    ├── Conflict                 conflict
    ├── TooLarge                 too_large
    ├── RateLimited              rate_limited (retryable)
    ├── Overloaded               overloaded (retryable)
    ├── Cancelled                cancelled
    ├── Stalled                  stalled
    ├── EngineError              engine_error
    ├── ResumeExpired            resume_expired (a dropped session could not be resumed)
    ├── InternalError            internal, and codes this client does not know
    └── ConnectionLost           no code: the connection failed or closed (retryable)

``retryable`` is the server's word on whether the same request may succeed
later; classes carry a default for errors raised on this side.
"""

from __future__ import annotations

from typing import ClassVar

from ferrous_client.protocol.errors import ErrorCode

__all__ = [
    "ERRORS_BY_CODE",
    "BadRequest",
    "Cancelled",
    "Conflict",
    "ConnectionLost",
    "EngineError",
    "FerrousClientError",
    "Forbidden",
    "InternalError",
    "ModelNotFound",
    "NotFound",
    "Overloaded",
    "RateLimited",
    "ResumeExpired",
    "Stalled",
    "TooLarge",
    "Unauthorized",
    "error_from_code",
]


class FerrousClientError(Exception):
    """Root of every error the client raises on purpose.

    ``code`` is the protocol error code (``None`` only for :class:`ConnectionLost`),
    ``generation_id`` the generation the error belongs to when there is one.
    """

    default_code: ClassVar[ErrorCode | None] = ErrorCode.INTERNAL
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        generation_id: str | None = None,
        retryable: bool | None = None,
        code: ErrorCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.generation_id = generation_id
        self.retryable = self.default_retryable if retryable is None else retryable
        self.code: ErrorCode | None = code if code is not None else self.default_code
        # Seconds after which a retry can succeed, when the server said (rate_limited).
        self.retry_after: float | None = None

    def __str__(self) -> str:
        where = f" [generation {self.generation_id}]" if self.generation_id else ""
        return f"{self.message}{where}"

    def __repr__(self) -> str:
        code = self.code.value if self.code is not None else "-"
        return f"{type(self).__name__}({code}: {self.message!r})"


class BadRequest(FerrousClientError):
    default_code = ErrorCode.BAD_REQUEST


class Unauthorized(FerrousClientError):
    default_code = ErrorCode.UNAUTHORIZED


class Forbidden(FerrousClientError):
    default_code = ErrorCode.FORBIDDEN


class NotFound(FerrousClientError):
    default_code = ErrorCode.NOT_FOUND


class ModelNotFound(FerrousClientError):
    default_code = ErrorCode.MODEL_NOT_FOUND


class Conflict(FerrousClientError):
    default_code = ErrorCode.CONFLICT


class TooLarge(FerrousClientError):
    default_code = ErrorCode.TOO_LARGE


class RateLimited(FerrousClientError):
    default_code = ErrorCode.RATE_LIMITED
    default_retryable = True


class Overloaded(FerrousClientError):
    default_code = ErrorCode.OVERLOADED
    default_retryable = True


class Cancelled(FerrousClientError):
    default_code = ErrorCode.CANCELLED


class Stalled(FerrousClientError):
    default_code = ErrorCode.STALLED


class EngineError(FerrousClientError):
    default_code = ErrorCode.ENGINE_ERROR


class ResumeExpired(FerrousClientError):
    """The session could not be resumed after a dropped connection (its window passed,
    or the messages missed are no longer kept): its generations are lost."""

    default_code = ErrorCode.RESUME_EXPIRED


class InternalError(FerrousClientError):
    default_code = ErrorCode.INTERNAL


class ConnectionLost(FerrousClientError):
    """The connection could not be opened, or closed while work was in flight.

    ``close_code`` and ``close_reason`` are the WebSocket close frame's (RFC 6455
    section 7.4) when one was received. Generations in flight are not replayed.
    """

    default_code = None
    default_retryable = True

    def __init__(
        self,
        message: str,
        *,
        generation_id: str | None = None,
        close_code: int | None = None,
        close_reason: str = "",
    ) -> None:
        super().__init__(message, generation_id=generation_id)
        self.close_code = close_code
        self.close_reason = close_reason


ERRORS_BY_CODE: dict[ErrorCode, type[FerrousClientError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.MODEL_NOT_FOUND: ModelNotFound,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.STALLED: Stalled,
    ErrorCode.ENGINE_ERROR: EngineError,
    ErrorCode.RESUME_EXPIRED: ResumeExpired,
    ErrorCode.INTERNAL: InternalError,
}


def error_from_code(
    code: str,
    message: str,
    *,
    generation_id: str | None = None,
    retryable: bool | None = None,
) -> FerrousClientError:
    """The exception for a wire error (``{"code", "message", "id", "retryable"}``).

    A code this client does not know (a newer server) becomes :class:`InternalError`
    with the message prefixed by the code, so nothing the server said is lost.
    """
    try:
        ec = ErrorCode(code)
    except ValueError:
        return InternalError(f"{code}: {message}", generation_id=generation_id, retryable=retryable)
    return ERRORS_BY_CODE[ec](message, generation_id=generation_id, retryable=retryable)
