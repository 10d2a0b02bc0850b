"""Loading a model in a worker, and what the gateway is told when that fails.

Kept apart from :mod:`engine.worker`'s decode loop: a load is one blocking
call that either yields a backend or is answered with a typed error, and that
error carries enough (path, reason, detail) for the gateway to say which file
failed and why, without the worker's loop knowing any backend.
"""

from __future__ import annotations

import time

from engine import ipc
from engine.backends import Backend, LoadParams, find_entry
from protocol.errors import ErrorCode, FerrousError, ModelLoadError

__all__ = ["load_backend", "load_failure"]


def load_backend(msg: ipc.LoadModel) -> tuple[Backend, float]:
    """The backend for ``msg`` (its entry chosen by the file, or by name) and the
    milliseconds its load took. Raises what the backend raised."""
    entry = find_entry(msg.path, msg.backend or None)
    cls = entry.backend_class()
    t0 = time.perf_counter()
    backend = cls.load(
        msg.path,
        LoadParams(
            msg.n_ctx,
            msg.n_threads,
            msg.n_batch,
            msg.n_seq,
            msg.chat_template,
            entry.decode_options(msg.options),
            msg.prefill_chunk,
            msg.kv_unified,
        ),
    )
    return backend, (time.perf_counter() - t0) * 1000


def load_failure(msg: ipc.LoadModel, exc: Exception) -> ipc.WorkerError:
    """The answer to a load that raised ``exc``: its own code where it has one, else an
    engine error naming the file, with the exception as the detail."""
    if isinstance(exc, ModelLoadError):
        return ipc.WorkerError(
            req=msg.req,
            code=exc.code.value,
            message=exc.message,
            retryable=False,
            path=exc.path,
            reason=exc.reason,
            detail=exc.detail,
        )
    if isinstance(exc, FerrousError):
        return ipc.WorkerError(
            req=msg.req, code=exc.code.value, message=exc.message, retryable=exc.retryable
        )
    return ipc.WorkerError(
        req=msg.req,
        code=ErrorCode.ENGINE_ERROR.value,
        message=str(exc),
        retryable=False,
        path=msg.path,
        reason="backend",
        detail=f"{type(exc).__name__}: {exc}",
    )
