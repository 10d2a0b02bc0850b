"""A flag the engine client raises to cut a worker's current decode step short.

A decode step of sixteen streams takes ~60 ms on two cores. A request that may
pause someone (a higher priority class, or a tenant below its fair share,
engine.preemption) would otherwise wait for the step in progress before its
own prompt is even looked at: a wait of up to one whole step added to its
first token, every time. So the engine client raises this flag right after it
sends such a request, and the backend's compute checks it between graph nodes
(llama.cpp's abort callback): the step stops within a node or two, llama.cpp
drops whatever that step had written to the cache, and the worker's next
cycle reads the request, pauses a sequence for it and steps again. The
interrupted step's work is lost (half a step on average, for each such
arrival), nothing else: no sequence advanced in it.

The flag is one byte of a small shared memory file (``memfd``) the pool
creates per worker and hands over as a file descriptor. The worker clears it
at the top of every cycle, before it reads control frames, so a flag raised
for a request it has already read costs at most a step started anew.

The check must not take the GIL: it runs on llama.cpp's compute thread,
hundreds of times a step. C's ``strlen`` is used as the callback, on a buffer
whose first byte is the flag and whose second is always NUL: it returns 1
(true) when the flag is up and 0 otherwise, with no Python involved.
"""

from __future__ import annotations

import ctypes
import mmap
import os

__all__ = ["Interrupt", "strlen_callback_address"]

_SIZE = 64


class Interrupt:
    """The shared flag; :meth:`create` in the engine client, :meth:`attach` in the worker."""

    def __init__(self, fd: int, mm: mmap.mmap) -> None:
        self.fd = fd
        self._mm = mm
        self._byte = ctypes.c_char.from_buffer(mm)

    @classmethod
    def create(cls) -> Interrupt:
        fd = os.memfd_create("ferrous-interrupt", os.MFD_CLOEXEC)
        os.ftruncate(fd, _SIZE)
        return cls(fd, mmap.mmap(fd, _SIZE))

    @classmethod
    def attach(cls, fd: int) -> Interrupt:
        return cls(fd, mmap.mmap(fd, _SIZE))

    @property
    def address(self) -> int:
        """Where the flag is in this process: a NUL-terminated string of length 0 or 1."""
        return ctypes.addressof(self._byte)

    def set(self) -> None:
        self._byte.value = b"x"

    def clear(self) -> None:
        self._byte.value = b"\0"

    def is_set(self) -> bool:
        return self._byte.value != b"\0"

    def close(self) -> None:
        del self._byte
        self._mm.close()
        os.close(self.fd)


def strlen_callback_address() -> int:
    """C's ``strlen``: called on :attr:`Interrupt.address`, true exactly when the flag is up."""
    libc = ctypes.CDLL(None)
    return ctypes.cast(libc.strlen, ctypes.c_void_p).value or 0
