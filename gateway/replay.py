"""The replay buffer behind session resume: numbered messages kept until they are acknowledged.

Every message about a generation gets the next number ``n`` of its session
and is kept here after it is sent, because a message written to a socket may
still be lost with the connection. A client that reconnects says the highest
``n`` it received; the buffer hands back everything after it, or says the
gap cannot be filled.

Memory is bounded per generation, not per session: a running generation
keeps at most ``per_generation`` bytes (its oldest messages go first), and
finished generations share one more such budget (the oldest finished one goes
first). Whatever is dropped raises ``lost``, the number below which a resume
can no longer be exact; ``ack`` drops what the client confirmed. The session
(:mod:`gateway.sessions`) uses :meth:`ReplayLog.has_room` to pause a
generation instead, while nobody reads it or while a client that acks has not
confirmed what it got, and adds with ``trim=False`` then: nothing is dropped
except past a hard limit on finished generations (``FINISHED_HARD`` budgets),
which only a client that stops acking while starting more generations meets.

Pure: no I/O, no clock, no asyncio.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["FINISHED_HARD", "ReplayLog"]

T = TypeVar("T")

FINISHED_HARD = 8  # finished generations are dropped past this many budgets, trim or not

_NO_ENTRIES: tuple[()] = ()  # a log's order before its first message (read-only, shared)


@dataclass(slots=True)
class _Entry(Generic[T]):
    n: int
    gen: str
    size: int
    msg: T
    dead: bool = False


class ReplayLog(Generic[T]):
    """Numbered messages of one session, by generation, within a byte budget."""

    def __init__(self, per_generation: int) -> None:
        if per_generation < 1:
            raise ValueError("per_generation must be at least 1 byte")
        self.per_generation = per_generation
        self.last_n = 0  # the number of the newest message (0: none yet)
        self.lost = 0  # every message numbered up to this one may be gone
        self.bytes = 0  # what the kept messages weigh, all generations together
        # By number; dropped ones marked dead. A deque costs ~0.7 KiB even empty, and
        # most sessions of a busy server sit idle: it is made on the first add.
        self._order: deque[_Entry[T]] = _NO_ENTRIES  # type: ignore[assignment]
        self._dead = 0  # dropped entries still in _order (compacted when they dominate)
        self._by_gen: dict[str, deque[_Entry[T]]] = {}
        self._gen_bytes: dict[str, int] = {}
        self._finished: dict[str, None] = {}  # generations that ended, oldest first
        self._finished_bytes = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_gen.values())

    def next_number(self) -> int:
        """Number the next message (numbers are never reused, even for dropped ones)."""
        self.last_n += 1
        return self.last_n

    def add(
        self, n: int, gen: str, msg: T, size: int, *, final: bool = False, trim: bool = True
    ) -> None:
        """Keep message ``n`` of generation ``gen``; ``final`` when it ends the generation.

        ``trim``: drop the generation's oldest messages past its budget. Off while
        nobody reads (the session waits for :meth:`has_room` instead), so a detached
        session loses nothing.
        """
        entry = _Entry(n, gen, size, msg)
        if not isinstance(self._order, deque):  # the first message
            self._order = deque()
        self._order.append(entry)
        q = self._by_gen.get(gen)
        if q is None:
            q = self._by_gen[gen] = deque()
        q.append(entry)
        self._gen_bytes[gen] = self._gen_bytes.get(gen, 0) + size
        self.bytes += size
        if gen in self._finished:  # more after its end (a done after an error)
            self._finished_bytes += size
        elif final:
            self._finished[gen] = None
            self._finished_bytes += self._gen_bytes[gen]
        elif trim:
            while self._gen_bytes[gen] > self.per_generation and len(q) > 1:
                self._drop(q.popleft())
        self._trim_finished(self.per_generation if trim else FINISHED_HARD * self.per_generation)

    def generations(self) -> list[str]:
        """The keys of the generations with messages kept."""
        return list(self._by_gen)

    def has_room(self, gen: str) -> bool:
        """Whether ``gen`` may add a message without pushing an older one out."""
        return self._gen_bytes.get(gen, 0) < self.per_generation

    def ack(self, n: int) -> None:
        """The client has every message up to ``n``: forget them."""
        n = min(n, self.last_n)
        while self._order and self._order[0].n <= n:
            entry = self._order.popleft()
            if entry.dead:
                self._dead -= 1
            else:
                q = self._by_gen[entry.gen]
                # Entries of a generation are in number order: this one is its oldest.
                q.popleft()
                self._forget_bytes(entry)
        self.lost = max(self.lost, n)

    def since(self, last: int) -> list[T] | None:
        """Every kept message after ``last``, in order; None when some of them were dropped
        (or ``last`` names a message never sent)."""
        if last < self.lost or last > self.last_n:
            return None
        return [e.msg for e in self._order if not e.dead and e.n > last]

    # -- dropping -------------------------------------------------------------------------

    def _trim_finished(self, limit: int) -> None:
        while self._finished_bytes > limit and len(self._finished) > 1:
            oldest = next(iter(self._finished))
            q = self._by_gen[oldest]
            while q:  # the last one leaves the generation out of _finished
                self._drop(q.popleft())

    def _drop(self, entry: _Entry[T]) -> None:
        entry.dead = True
        entry.msg = None  # type: ignore[assignment]  # the message's memory goes now
        self._dead += 1
        self.lost = max(self.lost, entry.n)
        self._forget_bytes(entry)
        while self._order and self._order[0].dead:
            self._order.popleft()
            self._dead -= 1
        if self._dead > 64 and self._dead * 2 > len(self._order):
            self._order = deque(e for e in self._order if not e.dead)
            self._dead = 0

    def _forget_bytes(self, entry: _Entry[T]) -> None:
        gen = entry.gen
        self.bytes -= entry.size
        left = self._gen_bytes[gen] - entry.size
        if gen in self._finished:
            self._finished_bytes -= entry.size
        if self._by_gen[gen]:
            self._gen_bytes[gen] = left
            return
        # Nothing of this generation is kept any more.
        del self._by_gen[gen]
        del self._gen_bytes[gen]
        self._finished.pop(gen, None)
