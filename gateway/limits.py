"""Admission limits for WebSocket handshakes: connections per address and per user, and a rate.

A public server meets clients that open connections and never use them, and
clients that reconnect in a tight loop. Both cost the gateway a file
descriptor, a protocol object and a session each, so the handshake is refused
(HTTP 429 with ``Retry-After``, before the upgrade) when

* one client address already holds ``max_connections_per_ip`` WebSockets,
* one user (tenant and user) already holds ``max_connections_per_user``, or
* one client address started more than ``handshake_rate`` handshakes per
  second, with bursts of ``handshake_burst`` (a token bucket per address).

Counts are taken when a handshake is admitted and given back by a
:class:`Lease` whose ``release`` is idempotent, so every close path (refused
later in the handshake, client gone, server shutdown, session error) can call
it in a ``finally`` without double counting.

Everything here runs on the event loop thread: no locks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["AdmissionControl", "Lease", "Refusal", "TokenBuckets"]

# Buckets of addresses that have been quiet long enough to be full again carry
# no information and are dropped once this many are kept.
_PRUNE_AT = 4096


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a handshake was refused and when the client may try again (seconds)."""

    message: str
    retry_after: int


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens per second, at most ``burst`` stored.

    A key's state is (tokens, time of last update); a key not seen for
    ``burst / rate`` seconds is full, which is also what an unknown key is, so
    such entries are pruned without changing any answer.
    """

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}
        self._prune_at = _PRUNE_AT

    def __len__(self) -> int:
        return len(self._state)

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when granted, else seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._state[key] = (tokens - 1.0, now)
        if len(self._state) >= self._prune_at:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._state = {k: v for k, v in self._state.items() if now - v[1] < full_after}
        # Amortised: a flood of distinct addresses prunes at doubling sizes, not on every call.
        self._prune_at = max(_PRUNE_AT, 2 * len(self._state))


@dataclass(eq=False, slots=True)
class Lease:
    """What one admitted connection holds; ``release`` gives it back (once)."""

    _control: AdmissionControl
    ip: str
    user: str | None = None
    _released: bool = field(default=False)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._control._drop(self._control._per_ip, self.ip)
        if self.user is not None:
            self._control._drop(self._control._per_user, self.user)


class AdmissionControl:
    """Per-address and per-user connection counts and the per-address handshake rate.

    A limit of 0 means unlimited; the counts are still kept (they are what
    ``/metrics`` and the tests look at, and cost a dict entry per address).
    """

    def __init__(
        self,
        *,
        per_ip: int = 0,
        per_user: int = 0,
        rate: float = 0.0,
        burst: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_ip = per_ip
        self.per_user = per_user
        self.buckets = TokenBuckets(rate, burst, clock)
        self._per_ip: dict[str, int] = {}
        self._per_user: dict[str, int] = {}

    # -- counts --------------------------------------------------------------------------

    def connections_from(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    def connections_of(self, user: str) -> int:
        return self._per_user.get(user, 0)

    @property
    def tracked(self) -> tuple[int, int]:
        """(addresses, users) with at least one connection: both 0 when all are closed."""
        return len(self._per_ip), len(self._per_user)

    # -- admission -----------------------------------------------------------------------

    def admit(self, ip: str) -> Lease | Refusal:
        """A new handshake from ``ip``: take a rate token, then an address slot."""
        wait = self.buckets.take(ip)
        if wait > 0:
            return Refusal(
                f"too many handshakes from {ip}: at most {self.buckets.rate:g} per second",
                max(1, math.ceil(wait)),
            )
        if self.per_ip and self._per_ip.get(ip, 0) >= self.per_ip:
            return Refusal(f"at most {self.per_ip} connections from one address", 1)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return Lease(self, ip)

    def admit_user(self, lease: Lease, user: str) -> Refusal | None:
        """The handshake authenticated as ``user``: take a user slot on ``lease``."""
        if lease.user is not None:
            raise RuntimeError("this lease already holds a user slot")
        if self.per_user and self._per_user.get(user, 0) >= self.per_user:
            return Refusal(f"at most {self.per_user} connections per user", 1)
        self._per_user[user] = self._per_user.get(user, 0) + 1
        lease.user = user
        return None

    @staticmethod
    def _drop(counts: dict[str, int], key: str) -> None:
        n = counts.get(key, 0) - 1
        if n > 0:
            counts[key] = n
        else:
            counts.pop(key, None)
