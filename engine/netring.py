"""Token rings over the control connection, for workers on another machine.

A local worker writes a generation's text into a shared-memory ring
(:mod:`engine.rings`); a worker on another host cannot. Its records travel as
:class:`engine.ipc.Text` frames on the control connection instead, with the
same bound: the producer (:class:`NetRingWriter`, in the worker) may have at
most ``capacity`` bytes of records that the consumer has not confirmed, and
pauses the sequence past that (``RingFull``, as a full ring does); the
consumer (:class:`NetRing`, in the gateway) confirms what it read with
:class:`engine.ipc.Resume` frames carrying its read counter, each time a
quarter of the capacity was read. Records
are sized as the shared ring sizes them, so both kinds pause alike.

The consumer's interface is the shared ring's (``read``, ``arm_wait``,
``used``, ``close``, ``name``); the producer's ``write`` raises ``RingFull``
or returns False (a ``Text`` frame wakes the consumer by itself).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from engine import ipc
from engine.rings import RingFull, record_size

__all__ = ["NET_PREFIX", "NetRing", "NetRingWriter", "is_net_ring", "net_ring_name"]

NET_PREFIX = "net:"


def net_ring_name(capacity: int) -> str:
    return f"{NET_PREFIX}{capacity}"


def is_net_ring(name: str) -> bool:
    return name.startswith(NET_PREFIX)


Record = tuple[list[int], bytes, bytes]


class NetRing:
    """The gateway's end: records fed from ``Text`` frames, read as from a ring."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.name = net_ring_name(capacity)
        self._records: deque[Record] = deque()
        self._size = 0  # bytes of records held here
        self.tail = 0  # bytes ever read
        self._confirmed = 0  # the read counter last sent to the producer

    def feed(self, ids: list[int], text: bytes, extra: bytes) -> None:
        self._records.append((ids, text, extra))
        self._size += record_size(text, len(ids), len(extra))

    def used(self) -> int:
        return self._size

    def read(self) -> tuple[list[Record], bool]:
        """Every record held; the second item says a confirmation is due (the caller
        sends ``Resume(gen, tail)``)."""
        records = list(self._records)
        self._records.clear()
        self.tail += self._size
        self._size = 0
        # A producer pauses only with about a capacity unconfirmed: confirming every
        # quarter read frees it in time, with one frame per quarter, not per token.
        due = self.tail - self._confirmed >= self.capacity // 4
        if due:
            self._confirmed = self.tail
        return records, due

    def arm_wait(self) -> bool:
        return not self._records

    def close(self) -> None:
        self._records.clear()


class NetRingWriter:
    """The worker's end: ``write`` sends a ``Text`` frame while the window allows."""

    def __init__(self, send: Callable[[ipc.FromWorker], None], gen: int, capacity: int) -> None:
        self._send = send
        self._gen = gen
        self.capacity = capacity
        self._head = 0  # bytes ever written
        self._acked = 0  # bytes the consumer confirmed it read

    def write(self, token_ids: list[int], text: bytes, extra: bytes = b"") -> bool:
        size = record_size(text, len(token_ids), len(extra))
        if size > self.capacity:
            raise ValueError(f"record of {size} bytes exceeds ring capacity {self.capacity}")
        if self.capacity - (self._head - self._acked) < size:
            raise RingFull
        self._send(ipc.Text(gen=self._gen, ids=token_ids, text=text, extra=extra))
        self._head += size
        return False

    def confirmed(self, tail: int) -> None:
        self._acked = max(self._acked, min(tail, self._head))

    def used(self) -> int:
        return self._head - self._acked

    def close(self) -> None:
        return None
