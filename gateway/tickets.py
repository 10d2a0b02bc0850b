"""Single-use WebSocket tickets, held in memory in a bounded table.

Browsers cannot set headers on a WebSocket handshake, so they fetch a
short-lived ticket over authenticated HTTP and put it in the URL. A ticket
is only as good as the credential it was issued for: it expires with it, and
is checked again (revoked key or token) when redeemed — that check belongs
to :class:`gateway.auth.Authenticator`, which owns this table. Only the
tickets' SHA-256 digests are kept.

Bounds: ``max_tickets`` in all, ``max_tickets_per_user`` per (tenant, user),
where a user's own oldest ticket makes room for its new one, so one user
cannot push other users' tickets out.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from gateway.principal import MAX_OPAQUE_CHARS, Principal, Unauthorized, digest

__all__ = ["Ticket", "TicketTable"]


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a ticket stands for, and when it stops doing so."""

    principal: Principal
    purge_at: float
    """When the table forgets it (issue time + TTL)."""
    expires_at: float
    """When it stops being accepted: ``purge_at`` or the credential's expiry if sooner."""


class TicketTable:
    """Issued, not yet redeemed tickets, oldest first. Safe to call from several threads."""

    def __init__(
        self, *, ttl: float, max_tickets: int, max_per_user: int, clock: Callable[[], float]
    ) -> None:
        self._ttl = ttl
        self._max = max_tickets
        self._max_per_user = max_per_user
        self._clock = clock
        self._lock = threading.Lock()
        self._tickets: dict[bytes, Ticket] = {}
        self._by_user: dict[tuple[str | None, str], list[bytes]] = {}

    def terms(self, principal: Principal) -> tuple[float, float]:
        """When a ticket issued now for ``principal`` is forgotten, and when it expires
        (never after the credential it was issued for)."""
        now = self._clock()
        if principal.expires_at is not None and principal.expires_at <= now:
            raise Unauthorized("token expired")
        purge_at = now + self._ttl
        expires_at = (
            purge_at if principal.expires_at is None else min(purge_at, principal.expires_at)
        )
        return purge_at, expires_at

    def issue(self, principal: Principal) -> str:
        """A new ticket for ``principal``; :class:`Unauthorized` when the table is full."""
        now = self._clock()
        purge_at, expires_at = self.terms(principal)
        ticket = secrets.token_urlsafe(32)
        key = digest(ticket)
        owner = (principal.tenant, principal.user)
        with self._lock:
            self._purge(now)
            mine = self._by_user.setdefault(owner, [])
            while len(mine) >= self._max_per_user:
                self._tickets.pop(mine.pop(0), None)
            if len(self._tickets) >= self._max:
                raise Unauthorized("too many outstanding tickets; try again shortly")
            self._tickets[key] = Ticket(principal, purge_at, expires_at)
            mine.append(key)
        return ticket

    def take(self, ticket: str) -> Ticket:
        """The entry of ``ticket``, which is spent either way; :class:`Unauthorized` if none."""
        now = self._clock()
        with self._lock:
            key = digest(ticket) if ticket and len(ticket) <= MAX_OPAQUE_CHARS else b""
            entry = self._tickets.pop(key, None)
            if entry is not None:
                self._forget(entry.principal, key)
            self._purge(now)
        if entry is None:
            raise Unauthorized("unknown or used ticket")
        return entry

    def __len__(self) -> int:
        return len(self._tickets)

    def _forget(self, principal: Principal, key: bytes) -> None:
        owner = (principal.tenant, principal.user)
        mine = self._by_user.get(owner)
        if mine is not None:
            with suppress(ValueError):
                mine.remove(key)
            if not mine:
                del self._by_user[owner]

    def _purge(self, now: float) -> None:
        # Insertion order is purge_at order (one TTL for all), so expired ones are in front.
        while self._tickets:
            oldest = next(iter(self._tickets))
            entry = self._tickets[oldest]
            if entry.purge_at > now:
                break
            del self._tickets[oldest]
            self._forget(entry.principal, oldest)
