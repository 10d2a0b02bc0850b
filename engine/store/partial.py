"""A download's files under ``partial/``: the bytes so far, their sidecar, the cross-process lock.

:mod:`engine.store.download` decides what to ask a server for; this module
holds what it keeps on disk between attempts and processes (see that
module's docstring for the layout), each operation's OS error turned into a
:class:`~engine.store.errors.StoreError` naming what was being done.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from io import FileIO
from pathlib import Path

import msgspec

from engine.store.errors import os_error

__all__ = [
    "PartialState",
    "Sidecar",
    "append_partial",
    "fsync_path",
    "hash_prefix",
    "lock_file",
    "read_sidecar",
    "write_sidecar",
]

_LOCK_POLL = 0.05  # seconds between non-blocking flock attempts
_HASH_BLOCK = 1 << 20


class Sidecar(msgspec.Struct):
    """What is known about the resource a partial is a prefix of (``<key>.json``)."""

    url: str
    etag: str | None = None
    last_modified: str | None = None
    total: int | None = None


class PartialState:
    """The partial on disk: its size and the running hash of exactly those bytes."""

    def __init__(self, path: Path, meta_path: Path, meta: Sidecar | None) -> None:
        self.path = path
        self.meta_path = meta_path
        self.meta = meta
        self.size = 0
        self.hasher = hashlib.sha256()
        self.total: int | None = meta.total if meta is not None else None
        self.restarted_416 = False


async def lock_file(path: Path, doing: str) -> int:
    """An exclusive flock on ``path`` (created if missing), polled without blocking the loop."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise os_error(exc, doing) from exc
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL)
            # the previous holder unlinks the file before unlocking: lock the current one
            try:
                st = os.stat(path)
                current = os.fstat(fd)
                same = (st.st_dev, st.st_ino) == (current.st_dev, current.st_ino)
            except FileNotFoundError:
                same = False
        except OSError as exc:
            os.close(fd)
            raise os_error(exc, doing) from exc
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def hash_prefix(path: Path, size: int) -> tuple[hashlib._Hash, int]:
    """The sha256 of the first ``size`` bytes of ``path`` (blocking; run in a thread)."""
    h = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while done < size:
            block = f.read(min(_HASH_BLOCK, size - done))
            if not block:
                break
            h.update(block)
            done += len(block)
    return h, done


def append_partial(f: FileIO, st: PartialState, buf: bytearray, doing: str) -> None:
    """Write ``buf`` at the end of the partial, hash it, and empty it."""
    if not buf:
        return
    data = bytes(buf)
    buf.clear()
    try:
        done = 0
        while done < len(data):
            done += f.write(memoryview(data)[done:])
    except OSError as exc:
        raise os_error(exc, doing) from exc
    st.hasher.update(data)
    st.size += len(data)


async def fsync_path(path: Path, doing: str) -> None:
    def sync() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        await asyncio.to_thread(sync)
    except OSError as exc:
        raise os_error(exc, doing) from exc


def read_sidecar(path: Path) -> Sidecar | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Sidecar)
    except (OSError, msgspec.DecodeError):
        return None  # missing or torn: resume without a validator (or start over)


def write_sidecar(path: Path, meta: Sidecar, doing: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(msgspec.json.encode(meta))
        os.replace(tmp, path)
    except OSError as exc:
        raise os_error(exc, doing) from exc
