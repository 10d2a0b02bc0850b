"""Shared-memory token rings: one bounded single-producer/single-consumer byte ring per generation.

A worker (producer) writes each text delta of a generation into the ring; the
gateway (consumer) reads it. Nothing is copied through the control socket, and
the ring's fixed capacity is the bound on what a generation can have in
flight between the two processes.

Layout of the segment (a file in ``/dev/shm``)::

    0   head              u64  bytes ever written (producer only)
    8   tail              u64  bytes ever read (consumer only)
    16  consumer_waiting  u32  consumer found the ring empty and sleeps
    20  producer_waiting  u32  producer found the ring full and paused
    24  capacity          u64
    64  data[capacity]

Counters only grow; a position is ``counter % capacity``. Each side writes only
its own counter, with one aligned 8-byte store (ctypes field), so the other
side never reads a torn value.

Wake-ups do not busy-poll: the consumer sets ``consumer_waiting`` before it
sleeps and the producer, after a write, sends one wake-up frame over the
control socket if the flag is set; the same is done in the other direction
with ``producer_waiting`` and a resume frame. Each side stores its flag or
counter and then loads the other side's, a store-then-load pattern that needs a
full memory barrier between the two (x86 may otherwise satisfy the load before
the store is visible): :func:`_fence` provides one. Both sides also re-check
now and then while asleep, so a lost wake-up could only cost latency.

A record is ``u32 text_len, u32 n_ids, u32 extra_len, i32 ids[n_ids], text,
extra`` and may wrap around the end of the data area; ``extra`` carries what
some generations add to their text (log-probabilities, encoded by the worker).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import threading
import uuid
from pathlib import Path

__all__ = [
    "DEFAULT_CAPACITY",
    "MIN_CAPACITY",
    "SHM_DIR",
    "SHM_PREFIX",
    "Ring",
    "RingFull",
    "record_size",
    "sweep_orphans",
]

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "ferrous-ring-"
HEADER_SIZE = 64
DEFAULT_CAPACITY = 64 * 1024
MIN_CAPACITY = 4 * 1024
_REC = struct.Struct("<III")


_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier: taking a lock is an atomic read-modify-write."""
    with _fence_lock:
        pass


class RingFull(Exception):
    """A record does not fit now; the producer must pause until the consumer reads."""


class _Header(ctypes.Structure):
    _fields_ = (
        ("head", ctypes.c_uint64),
        ("tail", ctypes.c_uint64),
        ("consumer_waiting", ctypes.c_uint32),
        ("producer_waiting", ctypes.c_uint32),
        ("capacity", ctypes.c_uint64),
    )


def record_size(text: bytes, n_ids: int, extra: int = 0) -> int:
    return _REC.size + 4 * n_ids + len(text) + extra


class Ring:
    """One side of a ring. :meth:`create` makes the segment, :meth:`attach` opens it."""

    def __init__(self, name: str, mm: mmap.mmap, *, owner: bool) -> None:
        self.name = name
        self._mm = mm
        self._hdr: _Header | None = _Header.from_buffer(mm)
        self._cap = int(self._hdr.capacity)
        self._owner = owner
        self._closed = False

    # -- lifetime -----------------------------------------------------------------

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY) -> Ring:
        """Create a new segment (consumer side, the owner that unlinks it)."""
        if capacity < MIN_CAPACITY:
            raise ValueError(f"ring capacity must be at least {MIN_CAPACITY} bytes")
        name = f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserve the pages now: a sparse file on a full tmpfs maps fine and
            # then kills the first process that touches a page with SIGBUS.
            # Allocated up front, a full /dev/shm is an OSError (ENOSPC) here.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, HEADER_SIZE + capacity)
            else:  # pragma: no cover - not Linux
                os.ftruncate(fd, HEADER_SIZE + capacity)
            mm = mmap.mmap(fd, HEADER_SIZE + capacity)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        _Header.from_buffer(mm).capacity = capacity
        return cls(name, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Open an existing segment by name (producer side)."""
        if not name.startswith(SHM_PREFIX) or "/" in name:
            raise ValueError(f"not a ring name: {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE + MIN_CAPACITY:
                raise ValueError(f"ring {name} is too small ({size} bytes)")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        ring = cls(name, mm, owner=False)
        if ring._cap != size - HEADER_SIZE:
            ring.close()
            raise ValueError(f"ring {name} has an inconsistent header")
        return ring

    def close(self) -> None:
        """Unmap; the owner also unlinks the segment. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._hdr = None  # release the exported buffer before closing the map
        self._mm.close()
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / self.name)

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def _h(self) -> _Header:
        hdr = self._hdr
        if hdr is None:
            raise ValueError(f"ring {self.name} is closed")
        return hdr

    def used(self) -> int:
        h = self._h
        return int(h.head - h.tail)

    # -- producer -----------------------------------------------------------------

    def write(self, token_ids: list[int], text: bytes, extra: bytes = b"") -> bool:
        """Append one record or raise :class:`RingFull`.

        Returns True when the consumer was waiting (the caller must wake it).
        On :class:`RingFull` the ``producer_waiting`` flag is set, so the consumer
        sends a resume frame after it frees space.
        """
        h = self._h
        size = record_size(text, len(token_ids), len(extra))
        if size > self._cap:
            raise ValueError(f"record of {size} bytes exceeds ring capacity {self._cap}")
        head = int(h.head)
        if self._cap - (head - int(h.tail)) < size:
            h.producer_waiting = 1
            _fence()
            # Re-check after raising the flag: the consumer may have read meanwhile.
            if self._cap - (head - int(h.tail)) < size:
                raise RingFull
            h.producer_waiting = 0
        buf = bytearray(size)
        _REC.pack_into(buf, 0, len(text), len(token_ids), len(extra))
        if token_ids:
            struct.pack_into(f"<{len(token_ids)}i", buf, _REC.size, *token_ids)
        start = _REC.size + 4 * len(token_ids)
        buf[start : start + len(text)] = text
        buf[start + len(text) :] = extra
        self._put(head, buf)
        h.head = head + size
        _fence()
        if h.consumer_waiting:
            h.consumer_waiting = 0
            return True
        return False

    def _put(self, counter: int, data: bytes | bytearray) -> None:
        pos = HEADER_SIZE + counter % self._cap
        first = min(len(data), HEADER_SIZE + self._cap - pos)
        self._mm[pos : pos + first] = data[:first]
        if first < len(data):
            self._mm[HEADER_SIZE : HEADER_SIZE + len(data) - first] = data[first:]

    # -- consumer -----------------------------------------------------------------

    def read(self) -> tuple[list[tuple[list[int], bytes, bytes]], bool]:
        """Take every complete record. Returns (records, producer_was_waiting).

        When the second item is True the caller must send the producer a resume
        frame: it paused on a full ring and this read freed space.
        """
        h = self._h
        tail = int(h.tail)
        avail = int(h.head) - tail
        records: list[tuple[list[int], bytes, bytes]] = []
        if avail:
            data = self._get(tail, avail)  # one copy of everything readable
            pos = 0
            while pos < avail:
                text_len, n_ids, extra_len = _REC.unpack_from(data, pos)
                pos += _REC.size
                ids = list(struct.unpack_from(f"<{n_ids}i", data, pos)) if n_ids else []
                pos += 4 * n_ids
                end = pos + text_len
                records.append((ids, data[pos:end], data[end : end + extra_len]))
                pos = end + extra_len
            h.tail = tail + avail
        _fence()
        if h.producer_waiting:
            h.producer_waiting = 0
            return records, True
        return records, False

    def arm_wait(self) -> bool:
        """Declare the consumer is about to sleep. Returns False if data arrived meanwhile."""
        h = self._h
        h.consumer_waiting = 1
        _fence()
        if h.head != h.tail:
            h.consumer_waiting = 0
            return False
        return True

    def _get(self, counter: int, n: int) -> bytes:
        pos = HEADER_SIZE + counter % self._cap
        first = min(n, HEADER_SIZE + self._cap - pos)
        out = self._mm[pos : pos + first]
        if first < n:
            out += self._mm[HEADER_SIZE : HEADER_SIZE + n - first]
        return out


def sweep_orphans() -> list[str]:
    """Unlink rings whose creating process is gone (after a crash of a gateway).

    Names carry the creator's pid; a segment whose pid no longer runs cannot be
    in use by anyone who owns it.
    """
    removed: list[str] = []
    try:
        entries = list(SHM_DIR.glob(SHM_PREFIX + "*"))
    except OSError:
        return removed
    for path in entries:
        pid_part = path.name[len(SHM_PREFIX) :].split("-", 1)[0]
        if not pid_part.isdigit():
            continue
        try:
            os.kill(int(pid_part), 0)
        except ProcessLookupError:
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
        except PermissionError:
            pass
    return removed
