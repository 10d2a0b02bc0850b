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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.mirror import Takeover, plan_takeover
from gateway.replay import ReplayLog
from protocol import messages as m
from protocol.codec import Codec
from protocol.errors import EngineError, FerrousError

if TYPE_CHECKING:
    from gateway.interface import Gateway

__all__ = ["RESTART_REASON", "Adopted", "interrupted_error", "take_over"]

log = logging.getLogger("ferrous.session")

RESTART_REASON = "the node running this generation stopped; it runs again from its request"


@dataclass(slots=True)
class Adopted:
    """A session taken over: its replay log, what to send first, and what to run again."""

    log: ReplayLog[m.ServerMessage]
    frames: list[str | bytes]  # the kept messages after the client's last, encoded
    generations: list[str]  # for ``ready.generations``
    plan: Takeover


def interrupted_error() -> EngineError:
    """For an interrupted generation that cannot run again (a pull, a voice stream)."""
    return EngineError("the node running this stopped; start it again", retryable=True)


async def take_over(
    g: Gateway, owner: tuple[str | None, str], hello: m.Hello, codec: Codec
) -> Adopted:
    """Take the mirrored session of ``hello.resume`` over for a connection of ``owner``.

    Raises what :meth:`gateway.mirror.SessionMirror.take` raises, and
    ``ResumeExpired`` when messages after ``hello.last`` are gone; the caller
    opens a new session then. The session (:meth:`gateway.sessions.Session`)
    sends ``ready`` and the frames, then runs ``plan.restart`` again.
    """
    assert hello.resume is not None
    token = hello.resume
    mirrored = await g.mirror.take(token, owner, hello.last)
    try:
        plan = plan_takeover(mirrored, hello.last)
    except FerrousError:
        g.mirror.ended(token)  # ours now, and of no use: forget it
        raise
    replay_log: ReplayLog[m.ServerMessage] = ReplayLog(g.config.limits.resume_buffer_bytes)
    frames: list[str | bytes] = []
    for msg in plan.replay:
        data = codec.encode(msg)
        frames.append(data)
        n = getattr(msg, "n", None) or 0
        gen = getattr(msg, "id", None) or ""
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        replay_log.add(n, f"{gen}#taken", msg, size, final=True)
    replay_log.last_n = plan.last_n
    replay_log.lost = max(replay_log.lost, hello.last)
    ids = {getattr(x, "id", None) for x in plan.replay}
    ids |= {r.id for r in plan.restart} | set(plan.failed)
    log.info(
        "session %s taken over from another node: %d messages sent again, %d generations "
        "run again, %d failed",
        mirrored.session,
        len(plan.replay),
        len(plan.restart),
        len(plan.failed),
    )
    return Adopted(replay_log, frames, sorted(x for x in ids if x), plan)
