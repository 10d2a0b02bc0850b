"""Resume bookkeeping on the client side: the highest message number seen, when to ack. Pure.

The server numbers every message about a generation (``n``) and keeps what
it sent until the client acknowledges it. The client remembers the highest
``n`` it received, offers it as ``last`` when it resumes, drops anything at
or below it (so nothing is delivered twice), and acknowledges after every
``done`` and every :data:`ACK_EVERY` messages, which lets the server free its
replay buffer early instead of at its byte limit.
"""

from __future__ import annotations

__all__ = ["ACK_EVERY", "ResumeState", "may_resume"]

ACK_EVERY = 64
# ... and every this many bytes of audio: a few chunks of speech fill the server's
# replay budget (256 KiB by default), which then waits for an ack to send more.
ACK_BYTES = 64 * 1024


def may_resume(close_code: int | None) -> bool:
    """Whether a connection that ended with ``close_code`` (None: no close frame) is resumed.

    Only a link that died without the server's close frame is: a close the
    server sent says the session ended (shutdown, a revoked or expired
    credential, another connection took the session over).
    """
    return close_code is None


class ResumeState:
    """The highest message number received in the session, and the acks it is owed."""

    def __init__(self) -> None:
        self._unacked_bytes = 0
        self.last = 0
        self._unacked = 0

    def receive(self, n: int) -> bool:
        """Message ``n`` arrived: False when it was already delivered."""
        if n <= self.last:
            return False
        self.last = n
        self._unacked += 1
        return True

    def should_ack(self, ends_generation: bool, size: int = 0) -> bool:
        """Whether to acknowledge ``last`` now (``size``: bytes of audio it carried)."""
        self._unacked_bytes += size
        if ends_generation or self._unacked >= ACK_EVERY or self._unacked_bytes >= ACK_BYTES:
            self._unacked = self._unacked_bytes = 0
            return True
        return False

    def resumed(self) -> None:
        """The session resumed: what was replayed is acknowledged with the next ack."""
        self._unacked = max(self._unacked, 1)
