"""Which sessions may be resumed, by token, and how long a dropped one is kept.

A session that said hello gets a resume token (when ``limits.resume_window``
is above 0) and is listed here under it. When its connection drops without a
close the client asked for, the session is *detached*: its generations keep
running into the replay buffer (:mod:`gateway.replay`) and a timer ends it
after the window. A new connection of the same user (tenant and user) that
presents the token within the window takes the session over; a connection
presenting it while the old one still looks alive takes it over as well (the
old socket is half-open more often than not). Anyone else is refused.

Each user may leave at most ``max_detached_sessions`` detached: past that the
oldest is ended, so a client that drops connections in a loop cannot keep
unbounded work running.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Protocol

from protocol.errors import Forbidden, ResumeExpired

__all__ = ["DetachedSessions", "Resumable"]

log = logging.getLogger("ferrous.resume")


class Resumable(Protocol):
    """What the registry needs of a session."""

    id: str
    resume_token: str | None
    owner: tuple[str | None, str]

    async def end(self) -> None:
        """Cancel the session's generations and forget it."""
        ...


class DetachedSessions:
    """Sessions by resume token; the detached ones with their expiry timers."""

    def __init__(self, window: float, per_user: int) -> None:
        self.window = window
        self.per_user = per_user
        self._by_token: dict[str, Resumable] = {}
        # Detached sessions, oldest first, with the handle that ends each.
        self._detached: OrderedDict[str, tuple[Resumable, asyncio.TimerHandle]] = OrderedDict()
        self._ending: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def __len__(self) -> int:
        """Sessions detached now."""
        return len(self._detached)

    def register(self, session: Resumable) -> None:
        """``session`` said hello and has a token: it may be resumed from now on."""
        if session.resume_token is not None:
            self._by_token[session.resume_token] = session

    def unregister(self, session: Resumable) -> None:
        """``session`` ended: its token resumes nothing any more."""
        if session.resume_token is not None:
            self._by_token.pop(session.resume_token, None)
        held = self._detached.pop(session.id, None)
        if held is not None:
            held[1].cancel()

    def get(self, token: str) -> Resumable | None:
        """The session of ``token`` in this process, if any."""
        return self._by_token.get(token)

    def detach(self, session: Resumable) -> None:
        """The connection of ``session`` dropped: keep it for the window, then end it."""
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.window, self._expire, session)
        self._detached[session.id] = (session, handle)
        mine = [s for s, _ in self._detached.values() if s.owner == session.owner]
        for old in mine[: max(0, len(mine) - self.per_user)]:
            log.info("ending detached session %s: too many detached for its user", old.id)
            self._end(old)

    def claim(self, token: str, owner: tuple[str | None, str]) -> Resumable:
        """The session ``token`` resumes, for a connection of ``owner``.

        The session is no longer detached once claimed (its timer is stopped);
        the caller attaches the new connection or ends the session.
        """
        session = self._by_token.get(token)
        if session is None:
            raise ResumeExpired("no session to resume: it ended, or its resume window passed")
        if session.owner != owner:
            raise Forbidden("the resume token belongs to another user's session")
        held = self._detached.pop(session.id, None)
        if held is not None:
            held[1].cancel()
        return session

    def detached_sessions(self) -> list[Resumable]:
        return [s for s, _ in self._detached.values()]

    def _expire(self, session: Resumable) -> None:
        if self._detached.get(session.id, (None,))[0] is not session:
            return
        log.info("session %s was not resumed within %g s: ending it", session.id, self.window)
        self._end(session)

    def _end(self, session: Resumable) -> None:
        self.unregister(session)
        task = asyncio.ensure_future(session.end())
        self._ending.add(task)  # a strong reference until it is done
        task.add_done_callback(self._ending.discard)
