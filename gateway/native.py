"""Native HTTP routes for model management: list, show, pull, copy, create, remove, ps, unload.

Every route needs the same credential as the WebSocket (Bearer JWT or API
key). Errors are the protocol's codes in a JSON body,
``{"error": {"code", "message", "retryable"}}``, with a matching HTTP status.
``POST /v1/models/pull`` streams Server-Sent Events (``event: progress``, then
``event: success`` or ``event: error``) unless ``"stream": false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.store.modelfile import Message, Modelfile, render_modelfile
from engine.store.pull import PullEvent
from engine.store.store import ModelRecord
from gateway.httpapi import SSE_HEADERS, Handler, http_status, read_body
from gateway.httpapi import guarded as _guarded
from protocol.errors import ErrorCode, FerrousError

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["model_routes", "modelfile_of", "native_error", "record_json"]


def native_error(exc: FerrousError) -> JSONResponse:
    body = {"error": {"code": exc.code.value, "message": exc.message, "retryable": exc.retryable}}
    headers = {"WWW-Authenticate": "Bearer"} if exc.code is ErrorCode.UNAUTHORIZED else None
    return JSONResponse(body, status_code=http_status(exc), headers=headers)


def record_json(record: ModelRecord) -> dict[str, Any]:
    """A stored model, in a shape that is also an OpenAI model object (``id``, ``object``…)."""
    m = record.manifest
    return {
        "id": record.ref.short,
        "object": "model",
        "created": int(record.modified),
        "owned_by": "ferrousforge",
        "name": record.ref.short,
        "model": str(record.ref),
        "digest": record.id,
        "size": record.size,
        "format": m.format,
        "modified_at": record.modified,
        "parent": m.parent,
        "source": m.source,
        "parameters": m.parameters,
    }


def modelfile_of(record: ModelRecord) -> str:
    m = record.manifest
    return render_modelfile(
        Modelfile(
            from_=m.parent or m.source or record.ref.short,
            parameters=dict(m.parameters),
            template=m.template,
            system=m.system,
            messages=[Message(x.role, x.content) for x in m.messages],
            license=list(m.license),
        )
    )


class _PullBody(msgspec.Struct, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    source: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    sha256: str | None = None
    stream: bool = True


class _CopyBody(msgspec.Struct, forbid_unknown_fields=True):
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    destination: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _CreateBody(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    modelfile: Annotated[str, msgspec.Meta(max_length=1_000_000)]


class _ModelBody(msgspec.Struct, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


def model_routes(gateway: Gateway) -> list[Route]:
    """The native model-management routes, bound to ``gateway``."""
    registry = gateway.models

    def guarded(fn: Handler) -> Handler:
        return _guarded(gateway, native_error, fn)

    async def list_models(request: Request) -> Response:
        records = await registry.manager.models()
        loaded = {x.name for x in gateway.engine.loaded()}
        out = []
        for r in records:
            item = record_json(r)
            item["loaded"] = str(r.ref) in loaded
            out.append(item)
        for name, entry in gateway.config.models.items():
            out.append(
                {
                    "id": name,
                    "object": "model",
                    "created": int(gateway.started_at),
                    "owned_by": "ferrousforge",
                    "name": name,
                    "model": name,
                    "path": entry.path,
                    "loaded": name in loaded,
                }
            )
        catalog = [
            {"name": n, "description": e.description, "source": e.source}
            for n, e in sorted(registry.manager.catalog.items())
            if ":" not in n
        ]
        # The OpenAI list shape ("object", "data"), with the store's own fields per model.
        return JSONResponse({"object": "list", "data": out, "catalog": catalog})

    async def show(request: Request) -> Response:
        name = request.path_params["name"]
        record = await registry.manager.store_get(name)
        body = record_json(record)
        m = record.manifest
        body.update(
            {
                "template": m.template,
                "system": m.system,
                "messages": [{"role": x.role, "content": x.content} for x in m.messages],
                "license": m.license,
                "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in m.files],
                "modelfile": modelfile_of(record),
            }
        )
        return JSONResponse(body)

    async def delete(request: Request) -> Response:
        removed = await registry.remove(request.path_params["name"])
        return JSONResponse({"deleted": request.path_params["name"], "blobs_removed": removed})

    async def copy(request: Request) -> Response:
        body = await read_body(gateway, request, _CopyBody)
        record = await registry.copy(body.source, body.destination)
        return JSONResponse(record_json(record))

    async def create(request: Request) -> Response:
        body = await read_body(gateway, request, _CreateBody)
        record = await registry.create(body.name, body.modelfile, remote=True)
        return JSONResponse(record_json(record))

    async def ps(request: Request) -> Response:
        return JSONResponse(
            {"models": [msgspec.structs.asdict(x) for x in gateway.engine.loaded()]}
        )

    async def unload(request: Request) -> Response:
        body = await read_body(gateway, request, _ModelBody)
        key = await registry.unload(body.model)
        return JSONResponse({"unloaded": key})

    async def pull(request: Request) -> Response:
        body = await read_body(gateway, request, _PullBody)
        if not body.stream:
            record = await registry.pull(
                body.model, source=body.source, sha256=body.sha256, remote=True
            )
            return JSONResponse({"status": "success", **record_json(record)})
        # Validate before the stream starts, so a bad request still gets a 4xx status.
        registry.check_remote_pull(body.model, body.source)
        return StreamingResponse(
            _pull_events(gateway, body), media_type="text/event-stream", headers=SSE_HEADERS
        )

    return [
        Route("/v1/models", guarded(list_models), methods=["GET"]),
        Route("/v1/models/pull", guarded(pull), methods=["POST"]),
        Route("/v1/models/copy", guarded(copy), methods=["POST"]),
        Route("/v1/models/create", guarded(create), methods=["POST"]),
        Route("/v1/models/unload", guarded(unload), methods=["POST"]),
        Route("/v1/ps", guarded(ps), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded(show), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded(delete), methods=["DELETE"]),
    ]


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _pull_events(gateway: Gateway, body: _PullBody) -> AsyncIterator[bytes]:
    """SSE for one pull; only the latest progress waits to be sent to a slow reader."""
    latest: list[PullEvent] = []
    wake = asyncio.Event()

    def on_progress(event: PullEvent) -> None:
        if event.status != "success":
            latest[:] = [event]
            wake.set()

    task = asyncio.create_task(
        gateway.models.pull(
            body.model, source=body.source, sha256=body.sha256, progress=on_progress, remote=True
        )
    )
    task.add_done_callback(lambda _t: wake.set())
    try:
        while True:
            await wake.wait()
            wake.clear()
            pending = latest[:]
            latest.clear()
            for e in pending:
                yield _sse("progress", msgspec.to_builtins(e))
            if task.done():
                break
        try:
            record = task.result()
        except FerrousError as exc:
            err = {"code": exc.code.value, "message": exc.message, "retryable": exc.retryable}
            yield _sse("error", {"error": err})
            return
        yield _sse("success", {"status": "success", **record_json(record)})
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, FerrousError):
                await task
