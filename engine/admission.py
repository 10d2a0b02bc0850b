"""Who gets a worker's sequence slot, and when: the engine client's admission half.

A generation is handed to a worker only when that worker has room for it, so
the order generations start in is decided here and nowhere else:

* a free slot on the least loaded live worker holding the model, at once,
  when nobody waits;
* else a place in the model's :class:`~engine.fairqueue.FairQueue`
  (priority, then turns between tenants), bounded (``overloaded``);
* else, for a request that may pause a running sequence
  (:mod:`engine.preemption`), one request more than the worker's slots.

Waiting callers are told their place whenever it changes, with an estimate
of the wait from how fast this model's waiting requests have been starting.
A waiting request that is cancelled, or whose model loses its last worker or
is unloaded, ends without starting.

The workers' own books (``load``: requests admitted per model; ``runners``:
who they are) live on the worker objects, which the pool owns; this module
only reads and updates them, on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from engine import preemption
from engine.fairqueue import FairQueue, Waiting
from engine.interface import WaitCallback
from engine.preemption import Runner
from engine.requests import FinishReason, GenerateRequest

__all__ = ["QUEUE_REPORT_S", "Admission", "Seat", "Stranded", "WaitCallback"]

# A waiting request's place is re-read this often (and reported when it changed).
QUEUE_REPORT_S = 0.25
# How much each measured gap between starts counts in a model's running estimate.
_GAP_WEIGHT = 0.2
# How much each finished generation's cost counts in its model's estimate (fairqueue).
_COST_WEIGHT = 0.2


class Seat(Protocol):
    """What admission needs to know of a worker."""

    index: int
    alive: bool
    models: dict[str, float]
    load: dict[str, int]  # requests admitted per model (running, paused or starting)
    runners: dict[str, dict[int, Runner]]  # per model: who they are


W = TypeVar("W", bound=Seat)


class Stranded(Exception):
    """A waiting request ends before it starts: its model lost its last worker, or it
    was cancelled."""

    def __init__(self, why: str, reason: FinishReason = FinishReason.ERROR) -> None:
        super().__init__(why)
        self.reason = reason


class _Ticket(Generic[W]):
    """A waiting request's place in a fair queue: the future its caller awaits."""

    __slots__ = ("fut", "prefer", "runner")

    def __init__(self, fut: asyncio.Future[W], runner: Runner, prefer: int | None) -> None:
        self.fut = fut
        self.runner = runner
        self.prefer = prefer


class Admission(Generic[W]):
    """Slots of every model on every worker, and the requests waiting for them."""

    def __init__(
        self, workers: Callable[[], Sequence[W]], slots: Callable[[str], int], max_queued: int
    ) -> None:
        self._workers = workers
        self._slots = slots
        self._max_queued = max_queued
        self._queues: dict[str, FairQueue[_Ticket[W]]] = {}
        self._waiting: dict[str, tuple[str, Waiting[_Ticket[W]]]] = {}
        self._orders = itertools.count(1)  # admission order: each request's Runner key
        self._charged: dict[int, float] = {}  # running request -> tokens its tenant was charged
        # Per model: when a waiting request last started, and the running mean gap.
        self._last_start: dict[str, float] = {}
        self._start_gap: dict[str, float] = {}
        self._spell: dict[str, float] = {}  # when the model's queue last stopped being empty

    def waiting(self, request_id: str) -> bool:
        return request_id in self._waiting

    def queued(self, model: str) -> int:
        """Requests waiting for room on ``model``."""
        queue = self._queues.get(model)
        return len(queue) if queue is not None else 0

    def room(
        self, model: str, arrival: Runner | None = None, prefer: int | None = None
    ) -> W | None:
        """The worker a request of ``model`` starts on now, or None when it must wait.

        Worker ``prefer`` (the one holding the request's prefix,
        engine.placement) when it has a free sequence slot, else the least
        loaded live worker holding the model with a free slot; else, for
        ``arrival``, a worker where it may pause a running
        sequence (engine.preemption: a lower priority class, or a tenant
        holding more than its share). Such a worker is handed one request more
        than its slots, at most twice its slots in all.
        """
        slots = self._slots(model)
        best: W | None = None
        for w in self._workers():
            if not w.alive or model not in w.models:
                continue
            used = w.load.get(model, 0)
            if used < slots and w.index == prefer:
                return w
            if used < slots and (best is None or used < best.load.get(model, 0)):
                best = w
        if best is not None or arrival is None:
            return best
        for w in self._workers():
            if not w.alive or model not in w.models or w.load.get(model, 0) >= 2 * slots:
                continue
            if preemption.victim(list(w.runners.get(model, {}).values()), arrival) is not None:
                return w
        return None

    async def admit(
        self,
        request: GenerateRequest,
        on_wait: WaitCallback | None = None,
        prefer: int | None = None,
    ) -> tuple[W, int]:
        """A worker with room reserved for ``request``, and the key to :meth:`leave` with.

        Raises :class:`Stranded` when the request ends while waiting (cancelled,
        or its model lost its last worker), Overloaded when the queue is full.
        """
        model = request.model
        queue = self._queues.setdefault(model, FairQueue(self._max_queued))
        order = next(self._orders)
        runner = Runner(order, request.tenant or "", request.priority, order)
        if not len(queue):
            w = self.room(model, runner, prefer)
            if w is not None:
                queue.charge(runner.tenant, queue.estimate)
                self._take(w, model, runner, queue.estimate)
                return w, order
        if not len(queue):
            self._spell[model] = time.monotonic()  # a spell of waiting begins
        granted: asyncio.Future[W] = asyncio.get_running_loop().create_future()
        entry = queue.push(
            runner.tenant, request.priority, _Ticket(granted, runner, prefer), request.weight
        )
        self._waiting[request.request_id] = (model, entry)
        self.grant(model)
        try:
            if on_wait is not None:
                told: int | None = None
                while not granted.done():
                    try:
                        place = queue.position(entry)
                    except ValueError:  # granted (or stranded) a moment ago
                        break
                    if place != told:
                        told = place
                        await on_wait(place, self._estimate(model, place))
                    await asyncio.wait((granted,), timeout=QUEUE_REPORT_S)
            return await granted, order
        except BaseException:
            if (
                not queue.remove(entry)
                and granted.done()
                and not granted.cancelled()
                and granted.exception() is None
            ):
                self.leave(granted.result(), model, order)  # granted as the caller left
            raise
        finally:
            self._waiting.pop(request.request_id, None)

    def grant(self, model: str) -> None:
        """Hand room on ``model``'s workers to waiting requests, in fair-queue order."""
        queue = self._queues.get(model)
        while queue is not None and len(queue):
            head = queue.peek()
            assert head is not None
            if head.handle.fut.done():
                queue.remove(head)  # its caller already left
                continue
            w = self.room(model, prefer=head.handle.prefer)
            if w is not None:
                taken = queue.pop()  # the head (pop charges its tenant the estimate)
                assert taken is head
            else:
                # No free slot: the first waiting request, in queue order, that may
                # pause a running one (a higher class, a tenant below its share).
                for head in queue.ordered():
                    if not head.handle.fut.done():
                        w = self.room(model, head.handle.runner)
                        if w is not None:
                            break
                if w is None:
                    return
                queue.remove(head)
                queue.charge(head.tenant, queue.estimate)
            self._take(w, model, head.handle.runner, queue.estimate)
            head.handle.fut.set_result(w)
            self._started(model)

    def grant_all(self) -> None:
        """A worker came or went: room may have appeared for any model."""
        for model in list(self._queues):
            self.grant(model)

    def leave(self, w: W, model: str, key: int, tokens: int | None = None) -> None:
        """A generation on ``w`` ended (or never started): its room goes to the next waiter.

        ``tokens`` (prompt tokens read plus tokens generated), when known,
        replaces the estimate its tenant was charged when it started
        (engine.fairqueue), and teaches the model's estimate.
        """
        w.load[model] = max(0, w.load.get(model, 0) - 1)
        runner = w.runners.get(model, {}).pop(key, None)
        charged = self._charged.pop(key, None)
        queue = self._queues.get(model)
        if tokens is not None and runner is not None and charged is not None and queue is not None:
            queue.charge(runner.tenant, tokens - charged)
            queue.estimate += _COST_WEIGHT * (max(1, tokens) - queue.estimate)
        self.grant(model)

    def strand(self, models: list[str], why: str) -> None:
        """Requests waiting for models no live worker holds any more end, retryable.

        A request waiting behind a worker that died ends with a retryable
        engine_error rather than waiting for a replacement that may never load
        the model.
        """
        for model in models:
            queue = self._queues.get(model)
            if queue is None or any(w.alive and model in w.models for w in self._workers()):
                continue
            while (entry := queue.pop()) is not None:
                if not entry.handle.fut.done():
                    entry.handle.fut.set_exception(Stranded(why))

    def drop(self, model: str, exc: BaseException) -> None:
        """The model was unloaded: everyone waiting for it ends with ``exc``."""
        queue = self._queues.pop(model, None)
        while queue is not None and (entry := queue.pop()) is not None:
            if not entry.handle.fut.done():
                entry.handle.fut.set_exception(exc)

    def cancel(self, request_id: str) -> bool:
        """End a waiting request without starting it; False when it is not waiting."""
        waiting = self._waiting.get(request_id)
        if waiting is None:
            return False
        model, entry = waiting
        queue = self._queues.get(model)
        if queue is not None and queue.remove(entry) and not entry.handle.fut.done():
            entry.handle.fut.set_exception(Stranded("cancelled", FinishReason.CANCELLED))
            return True
        return False

    def urgent(self, w: W, model: str, key: int) -> bool:
        """Whether admitted request ``key`` should cut ``w``'s step in progress short
        (engine.preemption.interrupts)."""
        runners = w.runners.get(model, {})
        arrival = runners.get(key)
        if arrival is None:
            return False
        others = [r for k, r in runners.items() if k != key]
        return preemption.interrupts(others, arrival, self._slots(model))

    def _take(self, w: W, model: str, runner: Runner, charged: float) -> None:
        w.load[model] = w.load.get(model, 0) + 1
        w.runners.setdefault(model, {})[runner.key] = runner
        self._charged[runner.key] = charged

    def _started(self, model: str) -> None:
        """A waiting request started: learn the gap since the last start, or since this
        spell of waiting began if that is later, so time nobody waited (a quiet
        hour) is never taken for a gap between starts."""
        now = time.monotonic()
        since = max(self._last_start.get(model, -1.0), self._spell.get(model, -1.0))
        self._last_start[model] = now
        if since >= 0:
            gap = self._start_gap.get(model)
            self._start_gap[model] = (
                now - since if gap is None else gap + _GAP_WEIGHT * (now - since - gap)
            )

    def _estimate(self, model: str, place: int) -> float | None:
        """Seconds until a request with ``place`` requests ahead starts, from recent starts."""
        gap = self._start_gap.get(model)
        return None if gap is None else round((place + 1) * gap, 2)
