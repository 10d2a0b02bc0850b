"""Native HTTP routes for model management: list, show, pull, copy, create, remove, ps, unload.

Every route needs the same credential as the WebSocket (Bearer JWT or API
key). Errors are the protocol's codes in a JSON body,
``{"error": {"code", "message", "retryable"}}``, with a matching HTTP status.
``POST /v1/models/pull`` streams Server-Sent Events (``event: progress``, then
``event: success`` or ``event: error``) unless ``"stream": false``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.modelfacts import ModelFacts, facts_of, kind_of
from engine.store.modelfile import Message, Modelfile, render_modelfile
from engine.store.pull import PullEvent
from engine.store.store import ModelRecord
from engine.store.urls import redact_url
from gateway.http_common import ClosingStream, Handler, http_status, read_body
from gateway.http_common import guarded as _guarded
from gateway.models import pull_progress
from gateway.namespaces import ModelView
from protocol.errors import ErrorCode, FerrousError

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = [
    "CopyBody",
    "CreateBody",
    "ModelBody",
    "PullBody",
    "model_routes",
    "modelfile_of",
    "native_error",
    "record_json",
]


def native_error(exc: FerrousError) -> JSONResponse:
    body = {"error": {"code": exc.code.value, "message": exc.message, "retryable": exc.retryable}}
    headers = {"WWW-Authenticate": "Bearer"} if exc.code is ErrorCode.UNAUTHORIZED else None
    return JSONResponse(body, status_code=http_status(exc), headers=headers)


def record_json(
    record: ModelRecord, *, admin: bool = False, facts: ModelFacts | None = None
) -> dict[str, Any]:
    """A stored model, in a shape that is also an OpenAI model object (``id``, ``object``…).

    ``source`` (a URL that may carry credentials, or a server path) is shown
    to admins only; ``details`` is what the model's own metadata says it is, and
    ``kind`` the jobs it serves (``text``, ``embed``, ``asr``, ``tts``, ``vad``,
    ``image-classify``), from those details.
    """
    m = record.manifest
    details = msgspec.to_builtins(facts) if facts is not None else None
    return {
        "details": details,
        "id": record.ref.short,
        "object": "model",
        "created": int(record.modified),
        "owned_by": "ferrousforge",
        "name": record.ref.short,
        "model": str(record.ref),
        "digest": record.id,
        "size": record.size,
        "format": m.format,
        "kind": kind_of(facts) if facts is not None else None,
        "modified_at": record.modified,
        "parent": m.parent,
        "source": redact_url(m.source) if admin else None,
        "parameters": m.parameters,
    }


def modelfile_of(record: ModelRecord, *, admin: bool = False) -> str:
    """``record`` as a Modelfile; its FROM shows a source URL or path to admins only."""
    m = record.manifest
    return render_modelfile(
        Modelfile(
            from_=m.parent or (redact_url(m.source) if admin else None) or record.ref.short,
            parameters=dict(m.parameters),
            template=m.template,
            system=m.system,
            messages=[Message(x.role, x.content) for x in m.messages],
            license=list(m.license),
            # The newest adapter (earlier ones come with FROM), as the blob it is.
            adapter=m.adapters[-1].digest if m.adapters else None,
        )
    )


class PullBody(msgspec.Struct, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    source: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    sha256: str | None = None
    stream: bool = True


class CopyBody(msgspec.Struct, forbid_unknown_fields=True):
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    destination: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class CreateBody(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    modelfile: Annotated[str, msgspec.Meta(max_length=1_000_000)]
    quantize: Annotated[str, msgspec.Meta(max_length=16)] | None = None


class ModelBody(msgspec.Struct, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


def model_routes(gateway: Gateway) -> list[Route]:
    """The native model-management routes, bound to ``gateway``."""
    registry = gateway.models

    def guarded(fn: Handler) -> Handler:
        return _guarded(gateway, native_error, fn)

    configured_facts: dict[str, ModelFacts | None] = {}

    async def configured_json(name: str, admin: bool) -> dict[str, Any]:
        """A model from the config's ``[models]`` table, in the same shape as stored ones
        (its facts read from its file once)."""
        path = gateway.config.models[name].path
        if path not in configured_facts:
            try:
                configured_facts[path] = await asyncio.to_thread(facts_of, path)
            except (FerrousError, OSError, ValueError):
                configured_facts[path] = None  # unreadable: said when it is loaded
        facts = configured_facts[path]
        return {
            "details": msgspec.to_builtins(facts) if facts is not None else None,
            "id": name,
            "object": "model",
            "created": int(gateway.started_at),
            "owned_by": "ferrousforge",
            "name": name,
            "model": name,
            "kind": kind_of(facts) if facts is not None else None,
            "path": path if admin else None,
            "loaded": name in gateway.engine.models(),
        }

    def view(request: Request) -> ModelView:
        return gateway.models_for(request.state.principal)

    async def list_models(request: Request) -> Response:
        v = view(request)
        records = await v.records()
        loaded = {x.name for x in v.loaded()}
        out = []
        for r in records:
            item = record_json(r, admin=v.admin, facts=await v.facts(r))
            item["loaded"] = r.ref.short in loaded or str(r.ref) in loaded
            out.append(item)
        out.extend([await configured_json(name, v.admin) for name in gateway.config.models])
        catalog = [
            {"name": n, "description": e.description}
            | ({"source": redact_url(e.source) or ""} if v.admin else {})
            for n, e in sorted(registry.manager.catalog.items())
            if ":" not in n
        ]
        # The OpenAI list shape ("object", "data"), with the store's own fields per model.
        return JSONResponse({"object": "list", "data": out, "catalog": catalog})

    async def show(request: Request) -> Response:
        v = view(request)
        name = request.path_params["name"]
        if name in gateway.config.models and v.key_for(name) == name:
            return JSONResponse(await configured_json(name, v.admin))  # a configured file
        record = await v.get(name)
        body = record_json(record, admin=v.admin, facts=await v.facts(record))
        m = record.manifest
        body.update(
            {
                "template": m.template,
                "system": m.system,
                "messages": [{"role": x.role, "content": x.content} for x in m.messages],
                "license": m.license,
                "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in m.files],
                "adapters": [
                    {"path": f.path, "digest": f.digest, "size": f.size} for f in m.adapters
                ],
                "modelfile": modelfile_of(record, admin=v.admin),
            }
        )
        return JSONResponse(body)

    async def delete(request: Request) -> Response:
        removed = await view(request).remove(request.path_params["name"])
        return JSONResponse({"deleted": request.path_params["name"], "blobs_removed": removed})

    async def copy(request: Request) -> Response:
        body = await read_body(gateway, request, CopyBody)
        v = view(request)
        record = await v.copy(body.source, body.destination)
        return JSONResponse(record_json(record, admin=v.admin))

    async def create(request: Request) -> Response:
        body = await read_body(gateway, request, CreateBody)
        v = view(request)
        record = await v.create(body.name, body.modelfile, quantize=body.quantize)
        return JSONResponse(record_json(record, admin=v.admin))

    async def ps(request: Request) -> Response:
        return JSONResponse({"models": [msgspec.structs.asdict(x) for x in view(request).loaded()]})

    async def unload(request: Request) -> Response:
        body = await read_body(gateway, request, ModelBody)
        key = await view(request).unload(body.model)
        return JSONResponse({"unloaded": key})

    async def pull(request: Request) -> Response:
        body = await read_body(gateway, request, PullBody)
        v = view(request)
        if not body.stream:
            record = await v.pull(body.model, source=body.source, sha256=body.sha256)
            return JSONResponse({"status": "success", **record_json(record, admin=v.admin)})
        # Validate before the stream starts, so a bad request still gets a 4xx status.
        v.check_pull(body.model, body.source)
        return ClosingStream(_pull_events(v, body))

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


async def _pull_events(view: ModelView, body: PullBody) -> AsyncIterator[bytes]:
    """SSE for one pull: ``progress`` events, then ``success`` or ``error``."""
    stream = pull_progress(view.pull_starter(body.model, body.source, body.sha256))
    try:
        async for item in stream:
            if isinstance(item, PullEvent):
                yield _sse("progress", msgspec.to_builtins(item))
            else:
                yield _sse("success", {"status": "success", **record_json(item, admin=view.admin)})
    except FerrousError as exc:
        err = {"code": exc.code.value, "message": exc.message, "retryable": exc.retryable}
        yield _sse("error", {"error": err})
    finally:
        await stream.aclose()
