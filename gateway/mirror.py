"""Sessions mirrored where another node can take them over.

A session that may be resumed keeps its numbered messages in a replay log
(:mod:`gateway.replay`) in this process. In a deployment that shares state,
the node also writes them to the shared store, with the requests of the
generations still running: when the node dies, the client's next connection
lands on another node, which finds the session there and *takes it over*
(:meth:`SessionMirror.take`): it sends what the client missed, and runs each
interrupted generation again from its request, after a ``restarted`` message
(the text it had sent is void). A conversation's turn joins the conversation
only when it is answered, so running it again repeats nothing.

:class:`NoMirror` is the one-node default: nothing is written, and a session
this process does not hold cannot be resumed. :func:`plan_takeover` decides
what a takeover sends; it is pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from protocol import messages as m
from protocol.errors import ResumeExpired

__all__ = ["MirroredSession", "NoMirror", "SessionMirror", "Takeover", "plan_takeover"]


class MirroredSession(msgspec.Struct, frozen=True):
    """What the store held of a session another node ran."""

    session: str  # its id on the node that ran it
    lost: int  # every message up to this number may be gone
    last_n: int  # the newest message number written
    messages: list[m.ServerMessage]  # the kept ones after the client's ``last``, in order
    pending: dict[str, m.ClientMessage | None]  # running generations: their requests


class Takeover(msgspec.Struct, frozen=True):
    """What the node taking a session over sends and runs (see :func:`plan_takeover`)."""

    replay: list[m.ServerMessage]
    restart: list[m.Generate | m.Chat]
    failed: list[str]  # interrupted generations that cannot run again (pulls, voice)
    last_n: int  # numbering goes on after this


def plan_takeover(mirrored: MirroredSession, last: int) -> Takeover:
    """What to send a client that saw every message up to ``last`` (pure).

    Raises :class:`ResumeExpired` when some message after ``last`` is gone (the
    client would miss it). Generations whose end was written are finished,
    whatever the pending list says; the others run again when their request
    is a ``generate`` or ``chat``, and fail (retryable) otherwise.
    """
    if last < mirrored.lost:
        raise ResumeExpired(
            f"the messages after n={last} are no longer kept (kept from n={mirrored.lost + 1})"
        )
    ended = {
        msg.id
        for msg in mirrored.messages
        if (isinstance(msg, m.Done | m.Error) and msg.id is not None)
        or (isinstance(msg, m.Progress) and msg.status == "success")
    }
    restart: list[m.Generate | m.Chat] = []
    failed: list[str] = []
    for gen_id, request in sorted(mirrored.pending.items()):
        if gen_id in ended:
            continue
        if isinstance(request, m.Generate | m.Chat):
            restart.append(request)
        else:
            failed.append(gen_id)
    return Takeover(
        [x for x in mirrored.messages if (getattr(x, "n", None) or 0) > last],
        restart,
        failed,
        max(mirrored.last_n, last),
    )


LostSession = Callable[[str], object]  # called with the token of a session another node took


class SessionMirror(Protocol):
    """Where a node's resumable sessions are written for the others (see the module).

    The writing methods queue and return at once (a token is the session's
    resume token); :meth:`sync` waits until what was queued is written.
    """

    shared: bool

    def opened(self, token: str, session: str, owner: tuple[str | None, str]) -> None: ...

    def sent(self, token: str, n: int, payload: bytes) -> None:
        """Message ``n`` (MessagePack of a server message) was sent to the client."""

    def started(self, token: str, gen_id: str, request: bytes) -> None:
        """Generation ``gen_id`` runs: its request (MessagePack), b"" when it cannot run again."""

    def finished(self, token: str, gen_id: str) -> None: ...

    def acked(self, token: str, n: int) -> None: ...

    def ended(self, token: str) -> None: ...

    async def sync(self) -> None:
        """Wait until everything queued so far is written (bounded: a store that is
        away delays a session by at most a couple of seconds)."""

    def on_lost(self, callback: LostSession) -> None:
        """``callback(token)`` when another node took this node's session over."""

    async def take(self, token: str, owner: tuple[str | None, str], last: int) -> MirroredSession:
        """Take over the session of ``token`` from a node that is gone.

        Raises ``ResumeExpired`` (no such session), ``Forbidden`` (another
        user's) or ``Conflict`` (its node is running, or another node took it).
        """

    async def start(self, tokens: Callable[[], list[str]]) -> None:
        """Keep the sessions of ``tokens()`` (this node's) from expiring in the store."""

    async def close(self) -> None: ...


class NoMirror:
    """One node: sessions live in this process only."""

    shared = False

    def opened(self, token: str, session: str, owner: tuple[str | None, str]) -> None:
        return None

    def sent(self, token: str, n: int, payload: bytes) -> None:
        return None

    def started(self, token: str, gen_id: str, request: bytes) -> None:
        return None

    def finished(self, token: str, gen_id: str) -> None:
        return None

    def acked(self, token: str, n: int) -> None:
        return None

    def ended(self, token: str) -> None:
        return None

    async def sync(self) -> None:
        return None

    def on_lost(self, callback: LostSession) -> None:
        return None

    async def take(self, token: str, owner: tuple[str | None, str], last: int) -> MirroredSession:
        raise ResumeExpired("no session to resume: it ended, or its resume window passed")

    async def start(self, tokens: Callable[[], list[str]]) -> None:
        return None

    async def close(self) -> None:
        return None
