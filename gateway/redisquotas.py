"""Quotas shared by every node of a deployment, kept in Redis.

The same limits as :class:`gateway.quotas.QuotaBook` — generations at once,
requests and tokens per minute, per tenant — with the counters in Redis, so
that a tenant spread over several replicas behind a load balancer gets its
quota once, not once per node. Each admission is one Lua script, atomic on
the Redis server and timed by the server's own clock (``TIME``), so nodes
with skewed clocks agree.

Generations running are members of a sorted set scored by when their lease
lapses; a node renews its leases every third of ``lease_ttl`` while they run
and removes them when they end. A node that dies stops renewing: its
generations stop counting ``lease_ttl`` later, without anyone cleaning up.
Token buckets are hashes (level, stamp) refilled on use.

When Redis cannot be reached, new generations are refused as ``overloaded``
(retryable) rather than run unmetered; a release that cannot be written is
logged, and its lease lapses on its own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from gateway.background import stop
from gateway.quotas import Lease, Quota
from protocol.errors import Overloaded, RateLimited

__all__ = ["RedisQuotas"]

log = logging.getLogger("ferrous.quotas")

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local id, ttl = ARGV[1], tonumber(ARGV[2])
local conc, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if conc > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= conc then return {1, n, 1000} end
end
local function level(key, per_min)
  local v = redis.call('HMGET', key, 'level', 'stamp')
  local lvl, stamp = tonumber(v[1]), tonumber(v[2])
  if lvl == nil or stamp == nil then return per_min end
  return math.min(per_min, lvl + (now - stamp) * per_min / 60)
end
local rl, tl = 0, 0
if rpm > 0 then
  rl = level(KEYS[2], rpm)
  if rl < 1 then return {2, 0, math.ceil((1 - rl) * 60000 / rpm)} end
end
if tpm > 0 then
  tl = level(KEYS[3], tpm)
  if tl <= 0 then return {3, 0, math.ceil((1 - tl) * 60000 / tpm)} end
end
if rpm > 0 then
  redis.call('HSET', KEYS[2], 'level', tostring(rl - 1), 'stamp', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120)
end
if tpm > 0 then
  redis.call('HSET', KEYS[3], 'level', tostring(tl), 'stamp', tostring(now))
  redis.call('EXPIRE', KEYS[3], 120)
end
redis.call('ZADD', KEYS[1], now + ttl, id)
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 60)
return {0, 0, 0}
"""

_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local used, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and used > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local v = redis.call('HMGET', KEYS[2], 'level', 'stamp')
  local lvl, stamp = tonumber(v[1]), tonumber(v[2])
  if lvl == nil or stamp == nil then lvl, stamp = tpm, now end
  lvl = math.min(tpm, lvl + (now - stamp) * tpm / 60) - used
  redis.call('HSET', KEYS[2], 'level', tostring(lvl), 'stamp', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120)
end
return 0
"""

_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', until_, ARGV[i + 1])
end
return 0
"""


class _RedisLease:
    __slots__ = ("_done", "_key", "_ledger", "_quota", "id", "tenant")

    def __init__(self, ledger: RedisQuotas, tenant: str, quota: Quota, key: str) -> None:
        self._ledger = ledger
        self.tenant = tenant
        self._quota = quota
        self._key = key
        self.id = secrets.token_hex(8)
        self._done = False

    def release(self, tokens: int = 0) -> None:
        if not self._done:
            self._done = True
            self._ledger._release(self, self._key, self._quota, tokens)


class RedisQuotas:
    """The :class:`~gateway.quotas.QuotaLedger` of a deployment, in Redis (see the module).

    ``url``: ``redis://host:port/db``, ``rediss://…`` or ``unix:///path/to/socket``.
    """

    def __init__(self, url: str, *, prefix: str = "ferrous:", lease_ttl: float = 30.0) -> None:
        import redis.asyncio as aioredis  # only where shared state is configured

        self._redis: Any = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._prefix = prefix
        self._ttl = lease_ttl
        self._admit = self._redis.register_script(_ADMIT)
        self._release_script = self._redis.register_script(_RELEASE)
        self._renew = self._redis.register_script(_RENEW)
        self._leases: dict[str, tuple[str, str]] = {}  # id -> (active key, id): to renew
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None

    def _keys(self, tenant: str) -> list[str]:
        # One hash tag per tenant: the three keys of a script live in one cluster slot.
        base = f"{self._prefix}q:{{{tenant}}}:"
        return [base + "active", base + "requests", base + "tokens"]

    async def admit(self, tenant: str, quota: Quota) -> Lease:
        keys = self._keys(tenant)
        lease = _RedisLease(self, tenant, quota, keys[0])
        if quota.unlimited():
            lease._done = True  # nothing counted, nothing to release
            return lease
        args: list[str | int | float] = [
            lease.id,
            self._ttl,
            quota.concurrent,
            quota.requests_per_minute,
            quota.tokens_per_minute,
        ]
        try:
            code, n, wait_ms = await self._admit(keys=keys, args=args)
        except Exception as exc:  # any client or connection failure: no unmetered work
            log.warning("quota store unavailable: %s", exc)
            raise Overloaded(
                "the shared quota store cannot be reached; retry shortly", retry_after=2.0
            ) from None
        retry = max(0.1, int(wait_ms) / 1000)
        if code == 1:
            raise RateLimited(
                f"tenant {tenant!r} already has {n} generations running or waiting "
                f"(its limit is {quota.concurrent}); retry when one ends",
                retry_after=retry,
            )
        if code == 2:
            raise RateLimited(
                f"tenant {tenant!r} has used its {quota.requests_per_minute} requests per minute",
                retry_after=retry,
            )
        if code == 3:
            raise RateLimited(
                f"tenant {tenant!r} has used its {quota.tokens_per_minute} tokens per minute",
                retry_after=retry,
            )
        self._leases[lease.id] = (keys[0], lease.id)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_leases(), name="quota leases")
        return lease

    def _release(self, lease: _RedisLease, key: str, quota: Quota, tokens: int) -> None:
        self._leases.pop(lease.id, None)
        task = asyncio.get_running_loop().create_task(
            self._write_release(key, lease, quota, tokens)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_release(self, key: str, lease: _RedisLease, quota: Quota, tokens: int) -> None:
        keys = [key, self._keys(lease.tenant)[2]]
        try:
            await self._release_script(keys=keys, args=[lease.id, tokens, quota.tokens_per_minute])
        except Exception as exc:
            log.warning("a quota release was not written (its lease lapses): %s", exc)

    async def _renew_leases(self) -> None:
        """Keep this node's running generations counted while they run."""
        while self._leases:
            await asyncio.sleep(self._ttl / 3)
            held = list(self._leases.values())
            if not held:
                continue
            try:
                await self._renew(
                    keys=[k for k, _ in held], args=[self._ttl, *(i for _, i in held)]
                )
            except Exception as exc:
                log.warning("quota leases not renewed: %s", exc)

    async def close(self) -> None:
        await stop(self._renewer)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()
