"""Errors of the model store: one class, a machine-readable ``reason``, a code per reason.

Store failures reach clients through every surface, so each one carries a
code from the protocol's fixed set (chosen from ``reason``) and a message
that says what to do about it::

    reason            code             meaning
    invalid           bad_request      a bad name, source or Modelfile
    not_found         model_not_found  no such model in the store, catalog or source
    exists            conflict         the target name is taken (cp without overwrite)
    digest_mismatch   engine_error     the bytes fetched do not have the expected sha256
    http              engine_error     the source answered with an HTTP error
    network           engine_error     the connection failed (retryable)
    source            engine_error     the source tool failed (pip, an archive)
    disk_full         internal         no space left on the store's file system
    permission        internal         the store's directory is not writable
    io                internal         any other OS error while writing the store
    in_use            conflict         the model has running generations
    forbidden         forbidden        the source leads where pulls may not go
    too_large         too_large        over the per-pull size cap or the partial quota
"""

from __future__ import annotations

import errno
import os

from protocol.errors import ErrorCode, FerrousError

__all__ = ["ModelfileError", "StoreError", "os_error"]

_CODES: dict[str, ErrorCode] = {
    "invalid": ErrorCode.BAD_REQUEST,
    "not_found": ErrorCode.MODEL_NOT_FOUND,
    "exists": ErrorCode.CONFLICT,
    "in_use": ErrorCode.CONFLICT,
    "forbidden": ErrorCode.FORBIDDEN,
    "too_large": ErrorCode.TOO_LARGE,
    "digest_mismatch": ErrorCode.ENGINE_ERROR,
    "http": ErrorCode.ENGINE_ERROR,
    "network": ErrorCode.ENGINE_ERROR,
    "source": ErrorCode.ENGINE_ERROR,
    "disk_full": ErrorCode.INTERNAL,
    "permission": ErrorCode.INTERNAL,
    "io": ErrorCode.INTERNAL,
}


class StoreError(FerrousError):
    """A store or pull failure; ``reason`` is one of the words in the module docstring."""

    def __init__(self, reason: str, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.reason = reason
        self.code = _CODES.get(reason, ErrorCode.INTERNAL)


class ModelfileError(StoreError):
    """A Modelfile that cannot be parsed: ``line`` (1-based) and ``directive`` say where."""

    def __init__(self, line: int, directive: str, message: str, *, source: str = "Modelfile"):
        where = f"{source}:{line}" + (f" ({directive})" if directive else "")
        super().__init__("invalid", f"{where}: {message}")
        self.line = line
        self.directive = directive
        self.detail = message


def os_error(exc: OSError, doing: str) -> StoreError:
    """Turn an OSError met while ``doing`` something into a StoreError that says so."""
    # The file's own name only: a server path in an answer describes the server's disk.
    name = os.path.basename(exc.filename) if exc.filename is not None else "the model store"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreError("disk_full", f"{doing}: no space left for {name} ({exc.strerror})")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError("permission", f"{doing}: permission denied on {name} ({exc.strerror})")
    return StoreError("io", f"{doing}: {exc.strerror or exc} ({name})")
