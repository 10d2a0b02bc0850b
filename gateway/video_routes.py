"""The video routes: ``POST /v1/video/analyze`` and the jobs it starts.

``POST /v1/video/analyze`` (the form: :mod:`gateway.video`; the video as a
``file``, or a ``url`` fetched as pulls are, see :func:`fetch_video`) answers in one of
three ways: the whole result as JSON once computed (a client that goes away
stops the work); every way is a job (:mod:`gateway.joblog`), whose place is
taken before the upload is read, so the running-job limits hold for all; with ``stream=true`` the events as server-sent events while
they are computed, each with an ``id`` line, after a first ``job`` event (and
a ``Location`` header) naming the job — which keeps running if the client
goes away; with ``detach=true`` at once, ``202`` and the job's id. A job's
events are then read with ``GET /v1/video/jobs/{id}`` (server-sent events
from ``Last-Event-ID``, or ``?after=N``), or over the WebSocket (``watch``),
and ``DELETE /v1/video/jobs/{id}`` stops it (:mod:`gateway.videojobs`).
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.store.download import Downloader
from engine.store.errors import StoreError
from engine.store.netpolicy import AddressPolicy
from gateway.forms import form_flag, form_text, read_form
from gateway.http_common import ClosingStream, guarded, unless_disconnected
from gateway.interface import Gateway
from gateway.joblog import JobLog
from gateway.model_routes import native_error
from gateway.openai_wire import InvalidParam
from gateway.scopes import MODELS_WRITE, require
from gateway.video import MAX_VIDEO_BYTES, VideoRequest, request_of
from gateway.videojobs import start_video_job
from protocol.errors import BadRequest, Forbidden, TooLarge, error_from_code

__all__ = ["video_routes"]


def _sse(job: JobLog, after: int, *, announce: bool) -> AsyncIterator[bytes]:
    async def events() -> AsyncIterator[bytes]:
        if announce:
            yield b"event: job\ndata: " + msgspec.json.encode({"id": job.id}) + b"\n\n"
        async for n, name, data in job.follow(after):
            body = msgspec.json.encode(data)
            yield f"id: {n}\nevent: {name}\ndata: ".encode() + body + b"\n\n"

    return events()


async def fetch_video(gateway: Gateway, url: str) -> bytes:
    """The video at ``url``, downloaded as pulls are: only by a scheme of ``[sources]
    schemes`` (``https``, or ``http`` where allowed), on every redirect hop too, to
    public addresses plus ``[sources] video_allow_hosts`` (not the pulls' list: a
    model mirror on the LAN is not a place any user may send the server), at most
    :data:`MAX_VIDEO_BYTES`; nothing kept."""
    sources = gateway.config.sources
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    schemes = [x for x in sources.schemes if x in ("http", "https")] or ["https"]
    if scheme not in schemes:
        raise InvalidParam("url", f"a video url must be {' or '.join(schemes)}://")
    scratch = gateway.models.home / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="video-") as tmp:
        downloader = Downloader(
            Path(tmp),
            policy=AddressPolicy(sources.video_allow_hosts, schemes=schemes),
            max_bytes=MAX_VIDEO_BYTES,
            retries=2,
        )
        try:
            got = await downloader.fetch(url)
        except StoreError as exc:
            if exc.reason == "too_large":
                raise TooLarge(exc.message) from None
            if exc.reason == "forbidden":
                raise Forbidden(exc.message) from None
            raise BadRequest(f"the video could not be fetched: {exc.message}") from None
        return await asyncio.to_thread(got.path.read_bytes)


def _whole(req: VideoRequest, events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The JSON answer made of a finished job's events; its error raised as itself."""
    name, last = events[-1]
    if name == "error":
        raise error_from_code(last["code"], last["message"])
    segments = [data for n, data in events if n == "segment"]
    return {
        "duration": last["duration"],
        "model": req.model,
        "frames": [data for n, data in events if n == "frame"],
        "transcript": None
        if "transcript" not in last
        else {"text": last["transcript"], "segments": segments},
        "notices": last.get("notices", []),
    }


def video_routes(gateway: Gateway) -> list[Route]:
    def job_url(job: JobLog) -> str:
        return f"/v1/video/jobs/{job.id}"

    async def analyze_route(request: Request) -> Response:
        principal = request.state.principal
        ticket = gateway.video_jobs.reserve(principal)  # before the upload is read
        try:
            form = await read_form(request, MAX_VIDEO_BYTES + 64 * 1024)
            try:
                upload = form.get("file")
                url = form_text(form, "url")
                if isinstance(upload, UploadFile) == bool(url):
                    raise InvalidParam(
                        "file", "the request needs the video: a file field named 'file', or a url"
                    )
                req = request_of(form)
                stream = form_flag(form, "stream")
                detach = form_flag(form, "detach")
                data = await upload.read() if isinstance(upload, UploadFile) else b""
            finally:
                await form.close()
            if url:
                if not gateway.config.sources.video_urls:
                    raise Forbidden("this server does not fetch videos from urls: send the file")
                require(principal.scopes, MODELS_WRITE, "have the server fetch a video url")
                data = await unless_disconnected(request, fetch_video(gateway, url))
            job = start_video_job(gateway, ticket, principal, data, req)
        finally:
            ticket.release()
        headers = {"Location": job_url(job)}
        if detach:
            body = {"id": job.id, "events": job_url(job)}
            return JSONResponse(body, status_code=202, headers=headers)
        if stream:
            return ClosingStream(_sse(job, 0, announce=True), headers=headers)

        async def whole() -> None:
            async for _ in job.follow():
                pass

        try:
            await unless_disconnected(request, whole())
        finally:
            if job.running:  # the client went away: nobody will read the answer
                gateway.video_jobs.cancel(principal, job.id)
        out = _whole(req, job.events)
        return Response(msgspec.json.encode(out), media_type="application/json")

    async def follow_route(request: Request) -> Response:
        job = gateway.video_jobs.get(request.state.principal, request.path_params["job"])
        raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        if not re.fullmatch(r"[0-9]{1,12}", raw):
            raise BadRequest("Last-Event-ID (or after) is the number of the last event seen")
        return ClosingStream(_sse(job, int(raw), announce=False))

    async def cancel_route(request: Request) -> Response:
        gateway.video_jobs.cancel(request.state.principal, request.path_params["job"])
        return Response(status_code=204)

    def route(path: str, fn: Any, method: str) -> Route:
        return Route(path, guarded(gateway, native_error, fn), methods=[method])

    return [
        route("/v1/video/analyze", analyze_route, "POST"),
        route("/v1/video/jobs/{job}", follow_route, "GET"),
        route("/v1/video/jobs/{job}", cancel_route, "DELETE"),
    ]
