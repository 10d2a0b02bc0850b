"""Revocations and WebSocket tickets of a deployment, in Redis (see :mod:`gateway.credentials`).

* ``{prefix}revoked`` — a sorted set: a revoked identity (``key:<prefix>``,
  ``jti:<id>``) scored by when its listing may go (the token's expiry; ``+inf``
  for a key). Every node reads the live part twice a second; entries past
  their score are dropped by whoever reads.
* ``{prefix}t:<sha256>`` — a ticket (its principal and expiry), set with the
  ticket's time to live and taken with ``GETDEL``: a ticket opens one
  WebSocket on one node. ``{prefix}tu:<user>`` counts a user's tickets in
  the current window, so one user cannot fill the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.auth import Principal, Unauthorized
from gateway.credentials import identities

if TYPE_CHECKING:
    from gateway.auth import Authenticator

__all__ = ["RedisRevocations", "RedisTickets"]

log = logging.getLogger("ferrous.auth")

_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

_ISSUE = """
local n = redis.call('INCR', KEYS[2])
if n == 1 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
if n > tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class RedisRevocations:
    """The :class:`~gateway.credentials.Revocations` of a deployment (see the module)."""

    def __init__(self, url: str, *, prefix: str = "ferrous:") -> None:
        import redis.asyncio as aioredis  # only where state is shared

        self._redis: Any = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._key = f"{prefix}revoked"
        self._live = self._redis.register_script(_LIVE)
        self._listed: frozenset[str] = frozenset()

    def revoked(self, principal: Principal) -> bool:
        return bool(self._listed) and any(x in self._listed for x in identities(principal))

    async def refresh(self) -> None:
        """Read the list; when Redis cannot be reached, what was read last still holds."""
        try:
            members = await self._live(keys=[self._key])
        except Exception as exc:
            log.warning("the revocation list cannot be read: %s", exc)
            return
        self._listed = frozenset(x.decode() if isinstance(x, bytes) else x for x in members)

    async def revoke(self, identity: str, until: float) -> None:
        score = "+inf" if math.isinf(until) else until
        await self._redis.zadd(self._key, {identity: score})
        await self.refresh()

    async def close(self) -> None:
        await self._redis.aclose()


class _Stored(msgspec.Struct):
    principal: Principal
    expires_at: float


class RedisTickets:
    """The :class:`~gateway.credentials.TicketBook` of a deployment (see the module)."""

    def __init__(
        self,
        url: str,
        auth: Authenticator,
        *,
        ttl: float,
        per_user: int,
        prefix: str = "ferrous:",
    ) -> None:
        import redis.asyncio as aioredis  # only where state is shared

        self._redis: Any = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._auth = auth
        self._ttl = max(1, math.ceil(ttl))
        self._per_user = per_user
        self._prefix = prefix
        self._issue = self._redis.register_script(_ISSUE)
        self._decoder = msgspec.json.Decoder(_Stored)

    def _key(self, ticket: str) -> str:
        return f"{self._prefix}t:{hashlib.sha256(ticket.encode()).hexdigest()}"

    async def issue(self, principal: Principal) -> str:
        _, expires_at = self._auth.ticket_terms(principal)
        ticket = secrets.token_urlsafe(32)
        owner = json.dumps([principal.tenant, principal.user], separators=(",", ":"))
        user_key = f"{self._prefix}tu:{hashlib.sha256(owner.encode()).hexdigest()[:32]}"
        data = msgspec.json.encode(_Stored(principal, expires_at))
        try:
            ok = await self._issue(
                keys=[self._key(ticket), user_key], args=[data, self._ttl, self._per_user]
            )
        except Exception as exc:
            log.warning("a ticket could not be stored: %s", exc)
            raise Unauthorized("tickets cannot be issued now; retry shortly") from None
        if not int(ok):
            raise Unauthorized("too many tickets issued for this user; try again shortly")
        return ticket

    async def redeem(self, ticket: str) -> Principal:
        if not ticket or len(ticket) > 512:
            raise Unauthorized("unknown or used ticket")
        try:
            raw = await self._redis.getdel(self._key(ticket))
        except Exception as exc:
            log.warning("a ticket could not be read: %s", exc)
            raise Unauthorized("tickets cannot be redeemed now; retry shortly") from None
        if raw is None:
            raise Unauthorized("unknown or used ticket")
        try:
            stored = self._decoder.decode(raw)
        except msgspec.DecodeError:
            raise Unauthorized("unknown or used ticket") from None
        return self._auth.redeemed(stored.principal, stored.expires_at)

    async def close(self) -> None:
        await self._redis.aclose()
