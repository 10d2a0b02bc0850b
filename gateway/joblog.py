"""Background jobs that outlive the request that started them, and keep what they said.

A long job (a video analysis) should not be lost when a browser tab reloads or
a phone changes networks. A :class:`JobLog` runs on its own and keeps every
event it produced (numbered from 1), so anyone allowed to see it follows it
from any point (:meth:`JobLog.follow`), and it can be cancelled.

Bounds: a user runs at most :data:`MAX_RUNNING_PER_USER` jobs at once (more is
``rate_limited``), everyone together :data:`MAX_RUNNING` (more is ``overloaded``),
and the registry holds :data:`MAX_JOBS`. A job nobody
follows for the keeping time (the session resume window, at least a minute)
should stop (:meth:`JobLogs.abandoned`, which the work checks between
events; :meth:`JobLogs.sweep` cancels one that does not), and a finished one
is dropped that long after its end. Jobs belong to their user and tenant:
others get ``not_found``, as for a job that never was.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import Principal
from protocol.errors import FerrousError, NotFound, Overloaded, RateLimited

__all__ = ["MAX_JOBS", "MAX_RUNNING", "MAX_RUNNING_PER_USER", "JobLog", "JobLogs"]

MAX_RUNNING_PER_USER = 2
MAX_RUNNING = 8  # jobs running at once, everyone's (each may hold an upload in memory)
MAX_JOBS = 256
_MIN_KEEP_S = 60.0


@dataclass
class JobLog:
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


def _finished(job: JobLog) -> None:
    """The job's task is over, however it ended (cancelled before it ran, even)."""
    if not job.events or job.events[-1][0] not in ("done", "error"):
        job.add("error", {"code": "cancelled", "message": "the job was cancelled"})
    job.finished_at = time.monotonic()
    job.changed.set()


class JobLogs:
    """Background jobs that keep their events for whoever follows them (see the module)."""

    def __init__(self, keep: float) -> None:
        self._keep = max(_MIN_KEEP_S, keep)
        self._jobs: dict[str, JobLog] = {}

    def start(self, principal: Principal, work: Callable[[JobLog], Awaitable[None]]) -> JobLog:
        """A new job of ``principal``'s running ``work`` now (which adds its events)."""
        self.sweep()
        owner = (principal.tenant, principal.user)
        running = sum(1 for j in self._jobs.values() if j.owner == owner and j.running)
        if running >= MAX_RUNNING_PER_USER:
            raise RateLimited(
                f"{running} of your jobs are running; at most {MAX_RUNNING_PER_USER} at once",
                retry_after=5.0,
            )
        if sum(1 for j in self._jobs.values() if j.running) >= MAX_RUNNING:
            raise Overloaded(f"{MAX_RUNNING} jobs are running; try again shortly", retry_after=5.0)
        if len(self._jobs) >= MAX_JOBS:
            raise RateLimited("the server holds as many jobs as it keeps", retry_after=5.0)
        job = JobLog(id="job_" + secrets.token_urlsafe(12), owner=owner)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, work), name=job.id)
        job.task.add_done_callback(lambda _t: _finished(job))
        return job

    async def _run(self, job: JobLog, work: Callable[[JobLog], Awaitable[None]]) -> None:
        try:
            await work(job)
        except FerrousError as exc:
            job.add("error", {"code": exc.code.value, "message": exc.message})
        except asyncio.CancelledError:
            job.add("error", {"code": "cancelled", "message": "the job was cancelled"})

    def abandoned(self, job: JobLog) -> bool:
        """Whether nobody has followed ``job`` for the keeping time (it should stop)."""
        return job.watchers == 0 and time.monotonic() - job.last_watched > self._keep

    def get(self, principal: Principal, job_id: str) -> JobLog:
        """``principal``'s job ``job_id``; NotFound for any other (or none)."""
        self.sweep()
        job = self._jobs.get(job_id)
        if job is None or job.owner != (principal.tenant, principal.user):
            raise NotFound(f"no job {job_id!r}")
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
