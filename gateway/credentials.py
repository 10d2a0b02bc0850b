"""Credential state a deployment must agree on: revocations and WebSocket tickets.

**Revocations.** A JWT is valid until it expires, and an API key lives in each
node's key file; withdrawing either everywhere, at once, needs a list every
node reads. ``ferrous token --revoke`` (by the token's ``jti``, until its
``exp``) and ``ferrous key revoke`` (by the key's prefix, for good) write to
it; every node rereads it twice a second (the gateway's revocation watch),
refuses the credential from then on, and ends the sessions opened with it.
One node keeps the list in ``FERROUS_HOME/revoked.json``
(:class:`FileRevocations`); a deployment in Redis
(:class:`gateway.redisauth.RedisRevocations`).

**Tickets** are single use: redeemed on one node, spent on all. One node keeps
them in the authenticator's table (:class:`LocalTickets`); a deployment in
Redis (:class:`gateway.redisauth.RedisTickets`), where a browser's ticket
fetched through one node opens its WebSocket on any other.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gateway.auth import Principal
from gateway.keyfiles import write_private_file

if TYPE_CHECKING:
    from gateway.auth import Authenticator

__all__ = [
    "REVOKED_FILE",
    "FileRevocations",
    "LocalTickets",
    "Revocations",
    "TicketBook",
    "identities",
    "key_identity",
    "token_identity",
]

log = logging.getLogger("ferrous.auth")

REVOKED_FILE = "revoked.json"


def key_identity(prefix: str) -> str:
    return f"key:{prefix}"


def token_identity(jti: str) -> str:
    return f"jti:{jti}"


def identities(principal: Principal) -> list[str]:
    """What a revocation of ``principal``'s credential would be listed under."""
    out = []
    if principal.key_id is not None:
        out.append(key_identity(principal.key_id))
    if principal.token_id is not None:
        out.append(token_identity(principal.token_id))
    return out


class Revocations(Protocol):
    def revoked(self, principal: Principal) -> bool:
        """Whether ``principal``'s credential is revoked, as of the last :meth:`refresh`
        (no I/O: it is asked on every authentication)."""

    async def refresh(self) -> None:
        """Read the list again."""

    async def revoke(self, identity: str, until: float) -> None:
        """List ``identity`` until ``until`` (Unix time; ``inf``: for good)."""

    async def close(self) -> None: ...


class FileRevocations:
    """One node's list, in a JSON file (``{identity: until}``, 0 for good)."""

    def __init__(self, path: Path, clock: object = time.time) -> None:
        self.path = path
        self._listed: frozenset[str] = frozenset()
        self._signature: tuple[int, int, int] | None = None
        self._clock = clock if callable(clock) else time.time
        self._load()

    def revoked(self, principal: Principal) -> bool:
        return bool(self._listed) and any(x in self._listed for x in identities(principal))

    async def refresh(self) -> None:
        self._load()

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return {str(k): float(v) for k, v in data.items()}

    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._listed, self._signature = frozenset(), None
            return
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._signature:
            return
        try:
            entries = self._read()
        except (OSError, ValueError) as exc:
            # Keep what was known: a list that cannot be read now revokes no less.
            log.warning("cannot read %s: %s", self.path, exc)
            return
        now = self._clock()
        self._listed = frozenset(k for k, until in entries.items() if until == 0 or until > now)
        self._signature = signature

    async def revoke(self, identity: str, until: float) -> None:
        self.revoke_now(identity, until)

    def revoke_now(self, identity: str, until: float) -> None:
        """:meth:`revoke` for a command-line caller (the file is rewritten atomically)."""
        entries = self._read()
        now = self._clock()
        kept = {k: v for k, v in entries.items() if v == 0 or v > now}
        kept[identity] = 0 if math.isinf(until) else until
        write_private_file(self.path, json.dumps(kept, indent=1).encode())
        self._load()

    async def close(self) -> None:
        return None


class TicketBook(Protocol):
    async def issue(self, principal: Principal) -> str:
        """A single-use ticket worth ``principal`` (see :meth:`Authenticator.issue_ticket`)."""

    async def redeem(self, ticket: str) -> Principal:
        """The ticket's principal; spent either way (raises ``Unauthorized``)."""

    async def close(self) -> None: ...


class LocalTickets:
    """Tickets in this process's authenticator (one node)."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    async def issue(self, principal: Principal) -> str:
        return self._auth.issue_ticket(principal)

    async def redeem(self, ticket: str) -> Principal:
        return self._auth.redeem_ticket(ticket)

    async def close(self) -> None:
        return None
