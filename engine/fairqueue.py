"""Who starts next when every sequence slot of a model is busy: priority, then fair share.

Requests that find no free slot wait here, one queue per model. The order
they leave in is decided only by this module:

1. a higher ``priority`` class first;
2. within a class, the tenant that has been served least, in tokens divided
   by its weight (weighted fair queueing, start-time fair queueing's virtual
   clock): a tenant whose generations are long, or whose weight is small,
   gets proportionally fewer turns; with equal weights and equal lengths it
   is a round robin. A flood from one tenant delays another's request by at
   most about one request per busy tenant, never by the whole flood;
3. within a tenant, first come first served.

Service is charged when a request leaves the queue, as an estimate (the
model's mean cost per generation, :attr:`FairQueue.estimate`), and corrected
with :meth:`FairQueue.charge` when it ends and its real count of tokens read
and generated is known. A tenant that starts waiting after a quiet spell
starts at the clock (the service of the last tenant served), not at its old
count: being idle earns no credit, and a long-idle tenant cannot take every
turn for a while either.

The queue is bounded: a request beyond ``limit`` waiting ones is refused with
``overloaded`` (retryable), never held in memory without bound. So are the
service records: a tenant is forgotten once its count falls back to the clock,
and beyond ``max(MIN_TENANTS, 4 * limit)`` records those of tenants not
waiting are forgotten, the least served first (they lose at most their lead
over the clock, which is what an idle tenant gets anyway).

Every waiting request's place is found in one replay of the order, kept until
the queue changes: callers polling their place cost O(1) each, not a replay.
Pure: no asyncio, no I/O; the engine client holds a future per entry.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

from protocol.errors import Overloaded

__all__ = ["FairQueue", "Waiting"]

T = TypeVar("T")

MIN_TENANTS = 1024  # service records kept however small the queue


class Waiting(Generic[T]):
    """One queued request: who asked, how urgent, and the caller's handle."""

    __slots__ = ("handle", "priority", "tenant")

    def __init__(self, tenant: str, priority: int, handle: T) -> None:
        self.tenant = tenant
        self.priority = priority
        self.handle = handle


class FairQueue(Generic[T]):
    """Waiting requests of one model; see the module docstring for the order."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        # priority -> tenant -> that tenant's requests; tenant order is the turn order.
        self._classes: dict[int, OrderedDict[str, deque[Waiting[T]]]] = {}
        self._size = 0
        self._estimate = 256.0
        self._served: dict[str, float] = {}  # tenant -> tokens served / weight
        self._weights: dict[str, float] = {}
        self._clock = 0.0  # the service of the tenant served last
        self._places: dict[int, int] | None = None  # id(entry) -> requests ahead, while valid

    def __len__(self) -> int:
        return self._size

    @property
    def estimate(self) -> float:
        """Tokens a generation is charged when it leaves the queue, before its real count."""
        return self._estimate

    @estimate.setter
    def estimate(self, tokens: float) -> None:
        self._estimate = tokens
        self._places = None

    def push(self, tenant: str, priority: int, handle: T, weight: float = 1.0) -> Waiting[T]:
        """Queue a request; Overloaded when ``limit`` requests already wait.

        ``weight`` is its tenant's share relative to others (1 by default).
        """
        if self._size >= self.limit:
            raise Overloaded(
                f"{self._size} requests are already waiting for this model; retry shortly"
            )
        if not weight > 0:
            raise ValueError("weight must be positive")
        entry = Waiting(tenant, priority, handle)
        self._places = None
        self._weights[tenant] = weight
        if not self._waits(tenant):
            self._served[tenant] = max(self._served.get(tenant, 0.0), self._clock)
        tenants = self._classes.setdefault(priority, OrderedDict())
        tenants.setdefault(tenant, deque()).append(entry)
        self._size += 1
        return entry

    def _waits(self, tenant: str) -> bool:
        return any(tenant in tenants for tenants in self._classes.values())

    def charge(self, tenant: str, tokens: float) -> None:
        """Count ``tokens`` (may be negative: a correction) as served to ``tenant``."""
        self._places = None
        served = self._served.get(tenant, self._clock) + tokens / self._weights.get(tenant, 1.0)
        if served <= self._clock and not self._waits(tenant):
            # It would restart at the clock anyway: forget it (bounded memory).
            self._served.pop(tenant, None)
            self._weights.pop(tenant, None)
        else:
            self._served[tenant] = served
            if len(self._served) > max(MIN_TENANTS, 4 * self.limit):
                self._forget_some()

    def _forget_some(self) -> None:
        """Drop the records of the least served quarter of tenants not waiting."""
        idle = sorted(
            (t for t in self._served if not self._waits(t)), key=lambda t: self._served[t]
        )
        for tenant in idle[: max(1, len(self._served) // 4)]:
            del self._served[tenant]
            self._weights.pop(tenant, None)

    def _next_tenant(self, tenants: OrderedDict[str, deque[Waiting[T]]]) -> str:
        # The least served; among equals, the one whose turn came longest ago.
        return min(tenants, key=lambda t: self._served.get(t, self._clock))

    def pop(self) -> Waiting[T] | None:
        """The request that starts next, removed from the queue; None when none waits."""
        if not self._size:
            return None
        self._places = None
        priority = max(self._classes)
        tenants = self._classes[priority]
        tenant = self._next_tenant(tenants)
        queue = tenants[tenant]
        entry = queue.popleft()
        if queue:
            tenants.move_to_end(tenant)  # among equals, the others go first
        else:
            del tenants[tenant]
            if not tenants:
                del self._classes[priority]
        self._size -= 1
        self._clock = max(self._clock, self._served.get(tenant, self._clock))
        self.charge(tenant, self.estimate)
        return entry

    def peek(self) -> Waiting[T] | None:
        """The request :meth:`pop` would return, left in the queue."""
        if not self._size:
            return None
        tenants = self._classes[max(self._classes)]
        return tenants[self._next_tenant(tenants)][0]

    def remove(self, entry: Waiting[T]) -> bool:
        """Take a request out, charging nothing; False when it is no longer queued.

        For a caller that gave up; one taken out to start out of turn is charged
        with :meth:`charge`.
        """
        tenants = self._classes.get(entry.priority)
        queue = tenants.get(entry.tenant) if tenants is not None else None
        if queue is None or entry not in queue:
            return False
        self._places = None
        queue.remove(entry)
        if not queue:
            assert tenants is not None
            del tenants[entry.tenant]
            if not tenants:
                del self._classes[entry.priority]
        self._size -= 1
        return True

    def _copy(self) -> FairQueue[T]:
        copy: FairQueue[T] = FairQueue(self.limit)
        copy._classes = {
            p: OrderedDict((t, deque(q)) for t, q in tenants.items())
            for p, tenants in self._classes.items()
        }
        copy._size = self._size
        copy._estimate = self._estimate
        copy._served = dict(self._served)
        copy._weights = dict(self._weights)
        copy._clock = self._clock
        return copy

    def ordered(self) -> list[Waiting[T]]:
        """Every waiting request in the order :meth:`pop` would return them."""
        copy = self._copy()
        out = []
        while (nxt := copy.pop()) is not None:
            out.append(nxt)
        return out

    def position(self, entry: Waiting[T]) -> int:
        """How many requests start before ``entry`` if nothing else arrives (0: next).

        Every place comes from one replay of :meth:`pop` on a copy (exact, O(n)
        in a bounded queue), kept until the queue changes.
        """
        if self._places is None:
            self._places = {id(e): i for i, e in enumerate(self.ordered())}
        place = self._places.get(id(entry))
        if place is None:
            raise ValueError("the entry is not queued")
        return place
