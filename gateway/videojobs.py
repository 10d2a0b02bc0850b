"""Video analyses as background jobs (:mod:`gateway.joblog`), and following one over a session.

``POST /v1/video/analyze`` with ``detach=true`` (or ``stream=true``) starts the
analysis as a job (:func:`start_video_job`); ``GET /v1/video/jobs/{id}``
(:mod:`gateway.video_routes`) and the WebSocket's ``watch`` (:func:`watch`)
follow it, from any event on; ``DELETE`` or a WebSocket ``cancel`` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from gateway.auth import Principal
from gateway.interface import Gateway
from gateway.joblog import JobLog, JobTicket
from gateway.video import VideoRequest, analyze, event_of
from gateway.voiceturn import VoiceHost
from protocol import messages as m
from protocol.errors import FerrousError, error_from_code

__all__ = ["start_video_job", "watch"]


def start_video_job(
    gateway: Gateway, ticket: JobTicket, principal: Principal, data: bytes, req: VideoRequest
) -> JobLog:
    """The analysis of ``data`` as a job of ``principal``'s in ``ticket``'s place, running now."""
    jobs = gateway.video_jobs

    async def work(job: JobLog) -> None:
        events = analyze(gateway, principal, data, req)
        async with contextlib.aclosing(events):
            async for ev in events:
                job.add(*event_of(ev))
                if jobs.abandoned(job):
                    job.add("error", {"code": "cancelled", "message": "nobody followed it"})
                    return

    return jobs.start(ticket, work)


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
        if msg.id in host._user_cancelled:  # the client's cancel, not the session ending
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
