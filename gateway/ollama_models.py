"""Ollama's model management under ``/api``: list, show, running models, pull,
delete, copy, create (with uploaded blobs) and version.

The generation routes (:mod:`gateway.ollama`) mount these beside their own, with
the same guard. Everything goes through the caller's :class:`ModelView`: a
tenant sees and changes its own models and reads the shared ones.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.modelfacts import ModelFacts
from engine.store.modelfile import Message, Modelfile, render_modelfile
from engine.store.names import looks_like_ref
from engine.store.pull import PullEvent
from engine.store.store import ModelRecord
from engine.store.urls import redact_url
from gateway.http_common import ClosingStream, read_body, unless_disconnected
from gateway.model_routes import modelfile_of
from gateway.models import pull_progress
from gateway.namespaces import ModelView
from protocol.errors import BadRequest, FerrousError

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = ["NDJSON", "ndjson_line", "ollama_model_routes"]

NDJSON = "application/x-ndjson"


class SeedTurn(msgspec.Struct):
    """A ``messages`` entry of ``/api/create``: a turn every conversation opens with."""

    role: str
    content: str


class NameBody(msgspec.Struct):
    model: str = ""
    name: str = ""  # older clients send "name"

    def target(self) -> str:
        value = self.model or self.name
        if not value:
            raise BadRequest("invalid request: Object missing required field `model`")
        return value


class PullBody(NameBody):
    stream: bool = True
    insecure: bool = False


class CopyBody(msgspec.Struct):
    source: Annotated[str, msgspec.Meta(min_length=1)]
    destination: Annotated[str, msgspec.Meta(min_length=1)]


class CreateBody(msgspec.Struct):
    model: str = ""
    name: str = ""
    modelfile: str | None = None  # older API: the Modelfile text
    from_: str | None = msgspec.field(default=None, name="from")
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    # What a Modelfile PARAMETER can say (anything else is a 400 naming the field).
    parameters: dict[str, int | float | str | bool | list[str] | None] | None = None
    messages: list[SeedTurn] | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    stream: bool = True


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _details(record: ModelRecord | None, facts: ModelFacts | None = None) -> dict[str, Any]:
    """Ollama's ``details``: read from the model's own metadata (engine.modelfacts)."""
    if record is None:
        return {"format": "gguf", "family": "", "families": None}
    f = facts or ModelFacts(format=record.manifest.format)
    return {
        "parent_model": record.manifest.parent or "",
        "format": record.manifest.format,
        "family": f.family,
        "families": [f.family] if f.family else None,
        "parameter_size": f.parameter_size,
        "quantization_level": f.quantization,
    }


def _model_info(facts: ModelFacts) -> dict[str, Any]:
    """Ollama's ``model_info``: GGUF-style keys for what the model's metadata says."""
    arch = facts.architecture
    info: dict[str, Any] = {"general.format": facts.format}
    if arch:
        info["general.architecture"] = arch
    if facts.parameter_count:
        info["general.parameter_count"] = facts.parameter_count
    if facts.quantization:
        info["general.quantization"] = facts.quantization
    if arch and facts.context_length:
        info[f"{arch}.context_length"] = facts.context_length
    if arch and facts.embedding_length:
        info[f"{arch}.embedding_length"] = facts.embedding_length
    return info


def ndjson_line(obj: dict[str, Any]) -> bytes:
    """One NDJSON line (compact, UTF-8)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def ollama_model_routes(gateway: Gateway, route: Callable[[str, Any, str], Route]) -> list[Route]:
    """The model-management routes, each made by ``route(path, handler, method)``."""

    def view(request: Request) -> ModelView:
        return gateway.models_for(request.state.principal)

    async def tags(request: Request) -> Response:
        v = view(request)
        records = await v.records()
        facts = [await v.facts(r) for r in records]
        return JSONResponse(
            {
                "models": [
                    {
                        "name": str(r.ref),
                        "model": str(r.ref),
                        "modified_at": _iso(r.modified),
                        "size": r.size,
                        "digest": r.id,
                        "details": _details(r, f),
                    }
                    for r, f in zip(records, facts, strict=True)
                ]
            }
        )

    async def show(request: Request) -> Response:
        body = await read_body(gateway, request, NameBody)
        v = view(request)
        record = await v.get(body.target())
        facts = await v.facts(record)
        man = record.manifest
        params = "\n".join(
            f"{k:<16}{json.dumps(v) if isinstance(v, str) else v}"
            for k, vs in man.parameters.items()
            for v in (vs if isinstance(vs, list) else [vs])
        )
        return JSONResponse(
            {
                "modelfile": modelfile_of(record, admin=v.admin),
                "parameters": params,
                "template": man.template or "",
                "system": man.system or "",
                "license": "\n".join(man.license),
                "details": _details(record, facts),
                "model_info": _model_info(facts)
                | ({"ferrous.source": redact_url(man.source)} if v.admin else {}),
                "modified_at": _iso(record.modified),
                "capabilities": list(facts.capabilities) or ["completion"],
            }
        )

    async def ps(request: Request) -> Response:
        out = []
        v = view(request)
        for x in v.loaded():
            record = await v.find(x.name) if looks_like_ref(x.name) else None
            out.append(
                {
                    "name": x.name,
                    "model": x.name,
                    "size": x.size,
                    "digest": record.id if record else "",
                    "details": _details(record, await v.facts(record) if record else None),
                    "expires_at": _iso(x.expires_at) or "2318-01-01T00:00:00Z",
                    "size_vram": 0,
                    "context_length": x.n_ctx,
                }
            )
        return JSONResponse({"models": out})

    async def pull(request: Request) -> Response:
        body = await read_body(gateway, request, PullBody)
        target = body.target()
        v = view(request)
        v.check_pull(target, None)
        if not body.stream:
            await unless_disconnected(request, v.pull(target))
            return JSONResponse({"status": "success"})
        return ClosingStream(_pull_lines(v, target), media_type=NDJSON)

    async def delete(request: Request) -> Response:
        body = await read_body(gateway, request, NameBody)
        await view(request).remove(body.target())
        return Response(status_code=200)

    async def copy(request: Request) -> Response:
        body = await read_body(gateway, request, CopyBody)
        await view(request).copy(body.source, body.destination)
        return Response(status_code=200)

    async def create(request: Request) -> Response:
        body = await read_body(gateway, request, CreateBody)
        name = body.model or body.name
        if not name:
            raise BadRequest("invalid request: Object missing required field `model`")
        # Uploaded blobs (POST /api/blobs/...): one GGUF model in ``files`` and at most one
        # LoRA in ``adapters``, each as {"file name": "sha256:..."}.
        base, projector = body.from_, None
        if body.files:
            if len(body.files) > 2 or base:
                raise BadRequest(
                    "files takes one GGUF model, or a model and its projector (and no `from`)"
                )
            # A vision model's projector is the file named for it (mmproj, projector).
            names = sorted(body.files, key=lambda n: "proj" in n.lower())
            base = body.files[names[0]]
            projector = body.files[names[1]] if len(names) == 2 else None
        adapter = None
        if body.adapters:
            if len(body.adapters) != 1:
                raise BadRequest("adapters takes one LoRA adapter per model")
            adapter = next(iter(body.adapters.values()))
        if body.modelfile is not None:
            text = body.modelfile
        else:
            if not base:
                raise BadRequest("invalid request: a model needs `from` (or a `modelfile`)")
            licenses = [body.license] if isinstance(body.license, str) else body.license or []
            text = render_modelfile(
                Modelfile(
                    from_=base,
                    projector=projector,
                    adapter=adapter,
                    parameters={k: v for k, v in (body.parameters or {}).items() if v is not None},
                    template=body.template,
                    system=body.system,
                    messages=[Message(t.role, t.content) for t in body.messages or []],
                    license=licenses,
                )
            )
        await view(request).create(name, text, quantize=body.quantize or None)
        if body.stream:
            return StreamingResponse(
                iter(
                    [
                        ndjson_line({"status": "writing manifest"}),
                        ndjson_line({"status": "success"}),
                    ]
                ),
                media_type=NDJSON,
            )
        return JSONResponse({"status": "success"})

    async def version(request: Request) -> Response:
        return JSONResponse({"version": gateway.version})

    async def blob_head(request: Request) -> Response:
        digest = request.path_params["digest"].replace("-", ":", 1)
        found = view(request).has_blob(digest)
        return Response(status_code=200 if found else 404)

    async def blob_upload(request: Request) -> Response:
        digest = request.path_params["digest"].replace("-", ":", 1)
        new = await view(request).upload_blob(digest, request.stream())
        return Response(status_code=201 if new else 200)

    return [
        route("/api/tags", tags, "GET"),
        route("/api/show", show, "POST"),
        route("/api/ps", ps, "GET"),
        route("/api/pull", pull, "POST"),
        route("/api/delete", delete, "DELETE"),
        route("/api/copy", copy, "POST"),
        route("/api/create", create, "POST"),
        route("/api/version", version, "GET"),
        route("/api/blobs/{digest}", blob_head, "HEAD"),
        route("/api/blobs/{digest}", blob_upload, "POST"),
    ]


async def _pull_lines(view: ModelView, target: str) -> AsyncIterator[bytes]:
    """NDJSON progress of a pull, then ``{"status": "success"}`` or an error line."""
    stream = pull_progress(view.pull_starter(target))
    try:
        async for item in stream:
            if isinstance(item, PullEvent):
                yield ndjson_line(msgspec.to_builtins(item))
            else:
                yield ndjson_line({"status": "success"})
    except FerrousError as exc:
        yield ndjson_line({"error": exc.message})
    finally:
        await stream.aclose()
