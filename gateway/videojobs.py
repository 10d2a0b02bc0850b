"""Video analyses as jobs that outlive the request that started them.

A long video takes a while; a browser tab that reloads or a phone that
changes networks should not lose the work. ``POST /v1/video/analyze`` with
``detach=true`` (or ``stream=true``) starts a :class:`VideoJob`: it runs on
its own, keeps every event it produced (numbered from 1; a few thousand small
ones at most, by the frame cap), and anyone allowed to see it follows it from
any point — ``GET /v1/video/jobs/{id}`` as server-sent events from
``Last-Event-ID`` (or ``?after=N``), or the WebSocket's ``watch`` — while
``DELETE`` (or a WebSocket ``cancel``) stops it.

Bounds: a user runs at most :data:`MAX_RUNNING_PER_USER` jobs at once (more
is ``rate_limited``), and the registry holds :data:`MAX_JOBS`. A job nobody
follows for ``limits.resume_window`` seconds is cancelled, and a finished
one is dropped that long after its end (at least a minute), so a client that
went away and comes back within the window finds it, and nothing waits for
a client that never does. Jobs belong to their user and tenant: others get
``not_found``, as for a job that never was.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import Principal
from gateway.interface import Gateway
from gateway.video import VideoRequest, analyze, event_of
from gateway.voiceturn import VoiceHost
from protocol import messages as m
from protocol.errors import FerrousError, NotFound, RateLimited, error_from_code

__all__ = ["MAX_JOBS", "MAX_RUNNING_PER_USER", "VideoJob", "VideoJobs", "watch"]

MAX_RUNNING_PER_USER = 2
MAX_JOBS = 256
_MIN_KEEP_S = 60.0


@dataclass
class VideoJob:
    id: str
    owner: tuple[str | None, str]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    finished_at: float | None = None
    watchers: int = 0
    last_watched: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def add(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((name, data))
        self.changed.set()
        self.changed = asyncio.Event()

    async def follow(self, after: int = 0) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
        """Events numbered after ``after`` (1-based), then each new one, to the last."""
        self.watchers += 1
        try:
            n = max(0, after)
            while True:
                while n < len(self.events):
                    name, data = self.events[n]
                    n += 1
                    self.last_watched = time.monotonic()
                    yield n, name, data
                if not self.running:
                    return
                await self.changed.wait()
        finally:
            self.watchers -= 1
            self.last_watched = time.monotonic()


def _finished(job: VideoJob) -> None:
    """The job's task is over, however it ended (cancelled before it ran, even)."""
    if not job.events or job.events[-1][0] not in ("done", "error"):
        job.add("error", {"code": "cancelled", "message": "the analysis was cancelled"})
    job.finished_at = time.monotonic()
    job.changed.set()


class VideoJobs:
    """The gateway's video jobs (see the module)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._jobs: dict[str, VideoJob] = {}

    @property
    def _keep(self) -> float:
        return max(_MIN_KEEP_S, float(self._gateway.config.limits.resume_window))

    def start(self, principal: Principal, data: bytes, req: VideoRequest) -> VideoJob:
        """A new job analysing ``data``, running now."""
        self.sweep()
        owner = (principal.tenant, principal.user)
        running = sum(1 for j in self._jobs.values() if j.owner == owner and j.running)
        if running >= MAX_RUNNING_PER_USER:
            raise RateLimited(
                f"{running} video analyses are running; at most {MAX_RUNNING_PER_USER} at once",
                retry_after=5.0,
            )
        if len(self._jobs) >= MAX_JOBS:
            raise RateLimited("the server holds as many video jobs as it keeps", retry_after=5.0)
        job = VideoJob(id="vid_" + secrets.token_urlsafe(12), owner=owner)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, principal, data, req), name=job.id)
        job.task.add_done_callback(lambda _t: _finished(job))
        return job

    async def _run(
        self, job: VideoJob, principal: Principal, data: bytes, req: VideoRequest
    ) -> None:
        events = analyze(self._gateway, principal, data, req)
        try:
            async with contextlib.aclosing(events):
                async for ev in events:
                    job.add(*event_of(ev))
                    if job.watchers == 0 and time.monotonic() - job.last_watched > self._keep:
                        job.add("error", {"code": "cancelled", "message": "nobody followed it"})
                        return
        except FerrousError as exc:
            job.add("error", {"code": exc.code.value, "message": exc.message})
        except asyncio.CancelledError:
            job.add("error", {"code": "cancelled", "message": "the analysis was cancelled"})

    def get(self, principal: Principal, job_id: str) -> VideoJob:
        """``principal``'s job ``job_id``; NotFound for any other (or none)."""
        self.sweep()
        job = self._jobs.get(job_id)
        if job is None or job.owner != (principal.tenant, principal.user):
            raise NotFound(f"no video job {job_id!r}")
        return job

    def cancel(self, principal: Principal, job_id: str) -> None:
        job = self.get(principal, job_id)
        if job.task is not None and job.running:
            job.task.cancel()

    def sweep(self) -> None:
        """Cancel jobs nobody has followed for the window; drop those long finished."""
        now = time.monotonic()
        for job in list(self._jobs.values()):
            if job.running and job.watchers == 0 and now - job.last_watched > self._keep:
                if job.task is not None:
                    job.task.cancel()
            elif job.finished_at is not None and now - job.finished_at > self._keep:
                del self._jobs[job.id]

    def close(self) -> None:
        """Cancel every running job (the server is stopping)."""
        for job in self._jobs.values():
            if job.task is not None and job.running:
                job.task.cancel()


async def watch(host: VoiceHost, msg: m.Watch) -> None:
    """A WebSocket ``watch``: the job's events from ``after`` on, as protocol messages."""
    try:
        job = host.gateway.video_jobs.get(host.principal, msg.job)
    except FerrousError as exc:
        await host.send_error(exc, msg.id)
        return
    await host.send(m.Started(msg.id, "video"))
    t0 = time.perf_counter()
    try:
        async for n, name, data in job.follow(msg.after):
            if name == "progress":
                await host.send(
                    m.Progress(msg.id, data["stage"], total=data["total"], completed=data["done"])
                )
            elif name in ("frame", "segment", "notice"):
                await host._take_credit(64 + 8 * len(data.get("embedding") or ()))
                await host.send(_video_event(msg.id, n, name, data))
            elif name == "error" and data["code"] != "cancelled":
                await host.send_error(error_from_code(data["code"], data["message"]), msg.id)
                return
            elif name in ("done", "error"):
                reason = "stop" if name == "done" else "cancelled"
                await host.send(_done(msg.id, reason, t0))
                return
    except asyncio.CancelledError:
        if not host.closed:  # the client's cancel (not the session ending): stop the job
            host.gateway.video_jobs.cancel(host.principal, job.id)
            with contextlib.suppress(Exception):
                await host.send(_done(msg.id, "cancelled", t0))
        raise


def _video_event(gen_id: str, seq: int, name: str, data: dict[str, Any]) -> m.VideoEvent:
    labels = data.get("labels")
    return m.VideoEvent(
        gen_id,
        name,  # type: ignore[arg-type]
        seq,
        t=data.get("t", data.get("start")),
        end=data.get("end"),
        labels=[m.LabelScore(x["label"], x["score"]) for x in labels] if labels else None,
        embedding=data.get("embedding"),
        text=data.get("text", data.get("message")),
    )


def _done(gen_id: str, reason: str, t0: float) -> m.Done:
    total = (time.perf_counter() - t0) * 1000
    return m.Done(gen_id, reason, m.Usage(0, 0), m.Timings(0.0, 0.0, 0.0, total, 0.0))
