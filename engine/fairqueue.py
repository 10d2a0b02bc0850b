"""Who starts next when every sequence slot of a model is busy: priority, then fair share.

Requests that find no free slot wait here, one queue per model. The order
they leave in is decided only by this module:

1. a higher ``priority`` class first;
2. within a class, tenants take turns (round robin): a tenant with a hundred
   queued requests and a tenant with one each get the next free slot in
   turn, so a flood from one tenant delays another's request by at most one
   request per busy tenant rather than by the whole flood;
3. within a tenant, first come first served.

The queue is bounded: a request beyond ``limit`` waiting ones is refused with
``overloaded`` (retryable), never held in memory without bound. Pure: no
asyncio, no I/O; the engine client holds a future per entry.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

from protocol.errors import Overloaded

__all__ = ["FairQueue", "Waiting"]

T = TypeVar("T")


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

    def __len__(self) -> int:
        return self._size

    def push(self, tenant: str, priority: int, handle: T) -> Waiting[T]:
        """Queue a request; Overloaded when ``limit`` requests already wait."""
        if self._size >= self.limit:
            raise Overloaded(
                f"{self._size} requests are already waiting for this model; retry shortly"
            )
        entry = Waiting(tenant, priority, handle)
        tenants = self._classes.setdefault(priority, OrderedDict())
        tenants.setdefault(tenant, deque()).append(entry)
        self._size += 1
        return entry

    def pop(self) -> Waiting[T] | None:
        """The request that starts next, removed from the queue; None when none waits."""
        if not self._size:
            return None
        priority = max(self._classes)
        tenants = self._classes[priority]
        tenant, queue = next(iter(tenants.items()))
        entry = queue.popleft()
        if queue:
            tenants.move_to_end(tenant)  # its next request waits for the others' turns
        else:
            del tenants[tenant]
            if not tenants:
                del self._classes[priority]
        self._size -= 1
        return entry

    def peek(self) -> Waiting[T] | None:
        """The request :meth:`pop` would return, left in the queue."""
        if not self._size:
            return None
        tenants = self._classes[max(self._classes)]
        return next(iter(tenants.values()))[0]

    def remove(self, entry: Waiting[T]) -> bool:
        """Take a request out (its caller gave up); False when it is no longer queued."""
        tenants = self._classes.get(entry.priority)
        queue = tenants.get(entry.tenant) if tenants is not None else None
        if queue is None or entry not in queue:
            return False
        queue.remove(entry)
        if not queue:
            assert tenants is not None
            del tenants[entry.tenant]
            if not tenants:
                del self._classes[entry.priority]
        self._size -= 1
        return True

    def ordered(self) -> list[Waiting[T]]:
        """Every waiting request in the order :meth:`pop` would return them."""
        copy: FairQueue[T] = FairQueue(self.limit)
        copy._classes = {
            p: OrderedDict((t, deque(q)) for t, q in tenants.items())
            for p, tenants in self._classes.items()
        }
        copy._size = self._size
        out = []
        while (nxt := copy.pop()) is not None:
            out.append(nxt)
        return out

    def position(self, entry: Waiting[T]) -> int:
        """How many requests start before ``entry`` if nothing else arrives (0: next).

        Found by replaying :meth:`pop` on a copy: exact, and O(n) in a bounded queue.
        """
        copy: FairQueue[T] = FairQueue(self.limit)
        copy._classes = {
            p: OrderedDict((t, deque(q)) for t, q in tenants.items())
            for p, tenants in self._classes.items()
        }
        copy._size = self._size
        ahead = 0
        while (nxt := copy.pop()) is not None:
            if nxt is entry:
                return ahead
            ahead += 1
        raise ValueError("the entry is not queued")
