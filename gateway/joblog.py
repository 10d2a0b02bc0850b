"""Background jobs that outlive the request that started them, and keep what they said.

A long job (a video analysis) should not be lost when a browser tab reloads or
a phone changes networks. A :class:`JobLog` runs on its own and keeps every
event it produced (numbered from 1), so anyone allowed to see it follows it
from any point (:meth:`JobLog.follow`), and it can be cancelled.

Bounds: a user runs at most :data:`MAX_RUNNING_PER_USER` jobs at once (more is
``rate_limited``), everyone together :data:`MAX_RUNNING` (more is ``overloaded``).
A route takes its place (:meth:`JobLogs.reserve`) before it reads an upload,
so refused requests cost nothing. Finished jobs are kept for reading, at most
:data:`MAX_KEPT_PER_USER` per user and :data:`MAX_JOBS` in all (the oldest
finished go first: one user's history never blocks another's work). A job nobody
follows for the keeping time (the session resume window, at least a minute)
should stop (:meth:`JobLogs.abandoned`, which the work checks between
events; :meth:`JobLogs.sweep` cancels one that does not), and a finished one
is dropped that long after its end. Jobs belong to their user and tenant:
others get ``not_found``, as for a job that never was.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import Principal
from protocol.errors import FerrousError, NotFound, Overloaded, RateLimited

__all__ = [
    "MAX_JOBS",
    "MAX_KEPT_PER_USER",
    "MAX_RUNNING",
    "MAX_RUNNING_PER_USER",
    "JobLog",
    "JobLogs",
    "JobTicket",
]

MAX_RUNNING_PER_USER = 2
MAX_RUNNING = 8  # jobs running at once, everyone's (each may hold an upload in memory)
MAX_KEPT_PER_USER = 16  # finished jobs kept for reading, per user
MAX_JOBS = 256
_MIN_KEEP_S = 60.0

log = logging.getLogger("ferrous.jobs")

Owner = tuple[str | None, str]


@dataclass
class JobLog:
    id: str
    owner: Owner
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


@dataclass
class JobTicket:
    """A running job's place, taken before its input is read (:meth:`JobLogs.reserve`)."""

    owner: Owner
    _logs: JobLogs
    used: bool = False

    def release(self) -> None:
        """Give the place back when no job was started with it (idempotent)."""
        if not self.used:
            self.used = True
            self._logs._pending[self.owner] -= 1
            if not self._logs._pending[self.owner]:
                del self._logs._pending[self.owner]


class JobLogs:
    """Background jobs that keep their events for whoever follows them (see the module)."""

    def __init__(self, keep: float) -> None:
        self._keep = max(_MIN_KEEP_S, keep)
        self._jobs: dict[str, JobLog] = {}
        self._pending: dict[Owner, int] = {}

    def reserve(self, principal: Principal) -> JobTicket:
        """A place for one more of ``principal``'s jobs; RateLimited / Overloaded when
        none is free. :meth:`start` uses it; :meth:`JobTicket.release` returns it."""
        self.sweep()
        owner = (principal.tenant, principal.user)
        running = self._pending.get(owner, 0) + sum(
            1 for j in self._jobs.values() if j.owner == owner and j.running
        )
        if running >= MAX_RUNNING_PER_USER:
            raise RateLimited(
                f"{running} of your jobs are running; at most {MAX_RUNNING_PER_USER} at once",
                retry_after=5.0,
            )
        everyone = sum(self._pending.values()) + sum(1 for j in self._jobs.values() if j.running)
        if everyone >= MAX_RUNNING:
            raise Overloaded(f"{MAX_RUNNING} jobs are running; try again shortly", retry_after=5.0)
        self._pending[owner] = self._pending.get(owner, 0) + 1
        return JobTicket(owner, self)

    def start(self, ticket: JobTicket, work: Callable[[JobLog], Awaitable[None]]) -> JobLog:
        """A new job in ``ticket``'s place, running ``work`` now (which adds its events)."""
        if ticket.used:
            raise RuntimeError("a job ticket starts one job")
        ticket.release()
        self._make_room(ticket.owner)
        job = JobLog(id="job_" + secrets.token_urlsafe(12), owner=ticket.owner)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, work), name=job.id)
        job.task.add_done_callback(lambda _t: _finished(job))
        return job

    def _make_room(self, owner: Owner) -> None:
        """Drop the oldest finished jobs past the owner's and everyone's keeping caps."""
        done = sorted(
            (j for j in self._jobs.values() if j.finished_at is not None),
            key=lambda j: j.finished_at or 0.0,
        )
        mine = [j for j in done if j.owner == owner]
        for job in mine[: max(0, len(mine) - MAX_KEPT_PER_USER + 1)]:
            self._jobs.pop(job.id, None)
        done = [j for j in done if j.id in self._jobs]
        for job in done[: max(0, len(self._jobs) - MAX_JOBS + 1)]:
            self._jobs.pop(job.id, None)

    async def _run(self, job: JobLog, work: Callable[[JobLog], Awaitable[None]]) -> None:
        try:
            await work(job)
        except FerrousError as exc:
            job.add("error", {"code": exc.code.value, "message": exc.message})
        except asyncio.CancelledError:
            job.add("error", {"code": "cancelled", "message": "the job was cancelled"})
        except Exception:
            # A fault in the work is the job's end, said to its followers, not a
            # task exception nobody reads.
            log.exception("job %s failed", job.id)
            job.add("error", {"code": "internal", "message": "the job failed on the server"})

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

    async def close(self) -> None:
        """Cancel every running job and wait for them to end (the server is stopping)."""
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
