"""Flow control bookkeeping: when to grant the server more bytes. Pure, no I/O.

With ``credits`` set in ``hello`` the server sends at most that many bytes of
delta text, session-wide, before the client grants more with ``credit``. The
client grants bytes back as the application *consumes* text (not as frames
arrive), in batches of half a window, so what sits unread in the client is
bounded by the window too::

    received ──▶ buffered (in a generation's queue) ──▶ consumed ──▶ granted
                                                        (batches of window/2)

The window is shared by all generations of a session. If the application
waits on one generation while the window is held by text of another it does
not read yet (consuming two generations one after the other), strict
accounting would stall both forever; in that case the client grants one more
window (:meth:`CreditWindow.starved`), trading the bound for progress.
"""

from __future__ import annotations

__all__ = ["CreditWindow"]


class CreditWindow:
    """Credit state of one session, as the client sees it.

    ``remaining`` is the client's view of what the server may still send: the
    window plus everything granted minus everything received. It is never
    below the server's own count (grants in flight only add to the server's).
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("the credit window must be at least 1 byte")
        self.window = window
        self.batch = max(1, window // 2)
        self.remaining = window
        self.buffered = 0
        self.ungranted = 0

    def received(self, n: int) -> None:
        """Delta text of ``n`` bytes arrived."""
        self.remaining -= n
        self.buffered += n

    def consumed(self, n: int) -> int:
        """The application took (or the client dropped) ``n`` bytes; returns bytes to grant now."""
        self.buffered -= n
        self.ungranted += n
        if self.ungranted < self.batch:
            return 0
        grant, self.ungranted = self.ungranted, 0
        self.remaining += grant
        return grant

    def starved(self) -> int:
        """A consumer waits with nothing to read: bytes to grant so the server can go on.

        Zero unless the server may already be paused (nothing remaining), which
        with an empty queue means the window is held by text buffered elsewhere.
        """
        if self.remaining > 0:
            return 0
        grant = self.window - self.remaining
        self.ungranted = 0
        self.remaining += grant
        return grant
