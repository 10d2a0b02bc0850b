"""Per-tenant quotas: generations at once, requests per minute, tokens per minute.

An operator sells or shares one server between tenants; each tenant's share
is bounded here, before any work is queued for it:

* ``concurrent``: generations running or waiting at once;
* ``requests_per_minute``: a token bucket of that many requests, refilled
  continuously (a burst of the whole minute's worth is allowed);
* ``tokens_per_minute``: prompt and completion tokens, charged when a
  generation ends (its real size is not known before), so a tenant may go
  into debt by one generation; new requests wait until the debt is repaid.

A ``weight`` is not a limit: it is the tenant's share when requests wait for
a model (engine.fairqueue orders them by tokens served per unit of weight).

Limits come from ``[quotas]`` (defaults for every tenant) and
``[quotas.tenants.NAME]``, and a JWT ``quota`` claim may set them for its
bearer's tenant; 0 means unlimited. Users without a tenant are their own
tenant. A refusal is :class:`~protocol.errors.RateLimited` with
``retry_after`` (seconds): when a retry can succeed.

:class:`QuotaBook` is pure state with an injected clock, on the event loop's
thread (no locks). The gateway holds quotas through :class:`QuotaLedger`: one
node's book (:class:`LocalQuotas`, the default), or counters shared by every
node of a deployment in Redis (:mod:`gateway.redisquotas`), so a tenant's
limits hold across replicas.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated, Protocol

import msgspec

from protocol.errors import RateLimited

__all__ = ["Lease", "LocalQuotas", "Quota", "QuotaBook", "QuotaLease", "QuotaLedger"]

_IDLE_PRUNE_S = 300.0  # a tenant with nothing running and full buckets is forgotten after this


_Limit = Annotated[int, msgspec.Meta(ge=0)]
_Weight = Annotated[float, msgspec.Meta(gt=0, le=1000)]


class Quota(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One tenant's limits (0 = unlimited), and its weight in the fair share of turns."""

    concurrent: _Limit = 0
    requests_per_minute: _Limit = 0
    tokens_per_minute: _Limit = 0
    # When requests wait for a model, a tenant of weight 2 is served twice the
    # tokens of a tenant of weight 1 (engine.fairqueue).
    weight: _Weight = 1.0

    def unlimited(self) -> bool:
        return not (self.concurrent or self.requests_per_minute or self.tokens_per_minute)


class _Bucket:
    """Tokens refilled at ``per_minute / 60`` a second up to ``per_minute``; may go negative."""

    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp

    def refill(self, per_minute: int, now: float) -> None:
        self.level = min(float(per_minute), self.level + (now - self.stamp) * per_minute / 60.0)
        self.stamp = now

    def wait(self, per_minute: int, need: float) -> float:
        """Seconds until the level reaches ``need``."""
        return max(0.0, (need - self.level) * 60.0 / per_minute)


class _Tenant:
    __slots__ = ("active", "requests", "seen", "tokens")

    def __init__(self, now: float) -> None:
        self.active = 0
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None
        self.seen = now


class QuotaLease:
    """A generation admitted under a tenant's quota; :meth:`release` once (idempotent)."""

    __slots__ = ("_book", "_done", "_quota", "tenant")

    def __init__(self, book: QuotaBook, tenant: str, quota: Quota) -> None:
        self._book = book
        self.tenant = tenant
        self._quota = quota
        self._done = False

    def release(self, tokens: int = 0) -> None:
        """The generation ended having used ``tokens`` (prompt + completion)."""
        if not self._done:
            self._done = True
            self._book._release(self.tenant, self._quota, tokens)


class QuotaBook:
    """The counters of every tenant under quota."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}

    def admit(self, tenant: str, quota: Quota) -> QuotaLease:
        """Count a new generation of ``tenant``, or raise RateLimited with ``retry_after``."""
        lease = QuotaLease(self, tenant, quota)
        if quota.unlimited():
            return lease
        now = self._clock()
        t = self._tenants.get(tenant)
        if t is None:
            self._prune(now)
            t = self._tenants[tenant] = _Tenant(now)
        t.seen = now
        if quota.concurrent and t.active >= quota.concurrent:
            raise RateLimited(
                f"tenant {tenant!r} already has {t.active} generations running or waiting "
                f"(its limit is {quota.concurrent}); retry when one ends",
                retry_after=1.0,
            )
        if quota.requests_per_minute:
            t.requests = t.requests or _Bucket(float(quota.requests_per_minute), now)
            t.requests.refill(quota.requests_per_minute, now)
            if t.requests.level < 1.0:
                raise RateLimited(
                    f"tenant {tenant!r} has used its {quota.requests_per_minute} requests "
                    "per minute",
                    retry_after=_ceil(t.requests.wait(quota.requests_per_minute, 1.0)),
                )
        if quota.tokens_per_minute:
            t.tokens = t.tokens or _Bucket(float(quota.tokens_per_minute), now)
            t.tokens.refill(quota.tokens_per_minute, now)
            if t.tokens.level <= 0.0:
                raise RateLimited(
                    f"tenant {tenant!r} has used its {quota.tokens_per_minute} tokens per minute",
                    retry_after=_ceil(t.tokens.wait(quota.tokens_per_minute, 1.0)),
                )
        if t.requests is not None and quota.requests_per_minute:
            t.requests.level -= 1.0
        t.active += 1
        return lease

    def active(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.active if t is not None else 0

    def _release(self, tenant: str, quota: Quota, tokens: int) -> None:
        t = self._tenants.get(tenant)
        if t is None:
            return
        t.active = max(0, t.active - 1)
        now = self._clock()
        t.seen = now
        if quota.tokens_per_minute and tokens:
            t.tokens = t.tokens or _Bucket(float(quota.tokens_per_minute), now)
            t.tokens.refill(quota.tokens_per_minute, now)
            t.tokens.level -= tokens

    def _prune(self, now: float) -> None:
        """Forget tenants idle long enough that their buckets are full again."""
        if len(self._tenants) < 1024:
            return
        for name, t in list(self._tenants.items()):
            if t.active == 0 and now - t.seen > _IDLE_PRUNE_S:
                del self._tenants[name]


def _ceil(seconds: float) -> float:
    """Round a wait up to a tenth of a second (never 0: the bucket is empty now)."""
    return max(0.1, math.ceil(seconds * 10) / 10)


class Lease(Protocol):
    """A generation admitted under its tenant's quota."""

    def release(self, tokens: int = 0) -> None:
        """The generation ended having used ``tokens`` (once; idempotent)."""


class QuotaLedger(Protocol):
    """Where the gateway admits generations against quotas (see the module)."""

    async def admit(self, tenant: str, quota: Quota) -> Lease:
        """Count a new generation of ``tenant``, or raise RateLimited with ``retry_after``."""

    async def close(self) -> None:
        """Let go of what the ledger holds (connections, leases of this node)."""


class LocalQuotas:
    """One node's quotas: a :class:`QuotaBook` on the event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.book = QuotaBook(clock)

    async def admit(self, tenant: str, quota: Quota) -> Lease:
        return self.book.admit(tenant, quota)

    async def close(self) -> None:
        return None
