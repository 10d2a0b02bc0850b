"""When to try opening a session again, and how long to wait first. Pure, no I/O.

Opening a session is retried on transport failures (refused, reset, timed
out: :class:`~ferrous_client.errors.ConnectionLost`) and on errors the server
marks retryable (``overloaded`` while it starts or drains, ``rate_limited``);
never on a refused credential or a bad request, which would fail the same way
again. Waits grow exponentially up to a cap, with jitter so that many clients
dropped at once do not come back in step.

Only the handshake is retried: generations that were in flight when a
connection dropped are not sent again (a generation never runs twice).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from ferrous_client.errors import BadRequest, FerrousClientError, Forbidden, Unauthorized

__all__ = ["Backoff", "should_retry"]


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """``attempts`` handshakes at most; waits of ``initial`` * ``factor``**n, capped at ``maximum``.

    Each wait is drawn uniformly from [(1 - ``jitter``) * w, w].
    """

    attempts: int = 5
    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be between 0 and 1")
        if self.initial < 0 or self.maximum < self.initial or self.factor < 1.0:
            raise ValueError("need 0 <= initial <= maximum and factor >= 1")

    def delays(self) -> Iterator[float]:
        """The waits between attempts: ``attempts - 1`` of them."""
        for n in range(self.attempts - 1):
            wait = min(self.maximum, self.initial * self.factor**n)
            yield wait * (1.0 - self.jitter * random.random())


def should_retry(exc: FerrousClientError) -> bool:
    """Transport failures and retryable server errors; never a credential or request error."""
    if isinstance(exc, Unauthorized | Forbidden | BadRequest):
        return False
    return exc.retryable
