"""A session resumed on another node than the one that ran it (see :mod:`gateway.mirror`).

The client's ``hello {resume, last}`` reached a node that does not hold the
session; the mirror finds it in the shared store, waits until the node that
held it is gone, and hands it to this node. The connection's new session takes
the old one's resume token (a later drop resumes it here), sends ``ready``
(``resumed: true``), every kept message after ``last``, then, for each
generation that was running, ``restarted`` and the generation again from its
request; an interrupted pull or voice stream ends with a retryable
``engine_error`` instead.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.mirror import plan_takeover
from gateway.replay import ReplayLog
from protocol import messages as m
from protocol.errors import EngineError, FerrousError

if TYPE_CHECKING:
    from gateway.sessions import Session

__all__ = ["take_over"]

log = logging.getLogger("ferrous.session")

RESTART_REASON = "the node running this generation stopped; it runs again from its request"


async def take_over(session: Session, hello: m.Hello) -> None:
    """Continue, on ``session``'s connection, the mirrored session of ``hello.resume``.

    Raises what :meth:`gateway.mirror.SessionMirror.take` raises, and
    ``ResumeExpired`` when messages after ``hello.last`` are gone; the caller
    opens a new session then.
    """
    assert hello.resume is not None
    g = session.gateway
    token = hello.resume
    mirrored = await g.mirror.take(token, session.owner, hello.last)
    try:
        plan = plan_takeover(mirrored, hello.last)
    except FerrousError:
        g.mirror.ended(token)  # ours now, and of no use: forget it
        raise
    replay_log: ReplayLog[m.ServerMessage] = ReplayLog(g.config.limits.resume_buffer_bytes)
    frames = []
    for msg in plan.replay:
        data = session.codec.encode(msg)
        frames.append(data)
        n = getattr(msg, "n", None) or 0
        gen = getattr(msg, "id", None) or ""
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        replay_log.add(n, f"{gen}#taken", msg, size, final=True)
    replay_log.last_n = plan.last_n
    replay_log.lost = max(replay_log.lost, hello.last)
    session.helloed = True
    session._credits = hello.credits
    session.resume_token = token
    session._log = replay_log
    g.resumable.register(session)
    ready = await session._ready(resumed=True)
    ids = {getattr(x, "id", None) for x in plan.replay}
    ids |= {r.id for r in plan.restart} | set(plan.failed)
    ready.generations = sorted(x for x in ids if x)
    async with session._send_lock:
        await session._write(session.codec.encode(ready))
        for frame in frames:
            await session._write(frame)
    log.info(
        "session %s taken over from another node: %d messages sent again, %d generations "
        "run again, %d failed",
        mirrored.session,
        len(plan.replay),
        len(plan.restart),
        len(plan.failed),
    )
    for gen_id in plan.failed:
        g.mirror.finished(token, gen_id)
        await session.send_error(
            EngineError("the node running this stopped; start it again", retryable=True), gen_id
        )
    for request in plan.restart:
        await session.send(m.Restarted(request.id, RESTART_REASON))
        try:
            session._start(request)
        except FerrousError as exc:
            g.mirror.finished(token, request.id)
            await session.send_error(exc, request.id)
