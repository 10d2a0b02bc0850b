"""Process tuning for many idle connections: the open-file limit and the garbage collector.

Every WebSocket is a file descriptor, and the usual soft limit (1024) stops
a server at about a thousand sessions while the hard limit allows far more;
:func:`raise_fd_limit` lifts the soft limit to the hard one at start-up.

CPython's cyclic collector walks every tracked container of a generation it
collects. Ten thousand idle sessions are a few hundred thousand long-lived
containers (protocol objects, parsers, tasks, dicts) that a full collection
walks over and over, each time pausing every stream on the loop. Two
measures keep those pauses away:

* higher thresholds (:data:`GC_THRESHOLDS`): the young generation is
  collected every 50 000 net allocations instead of 700, so a burst of
  handshakes or deltas does not trigger collections over and over;
* :meth:`GcTuner.freeze` moves everything alive into the permanent
  generation, which collections never walk: once after start-up (the app,
  the models' metadata, imported modules), and again shortly after each
  burst of ``freeze_every`` accepted connections, so the sessions of a burst
  leave the collector's working set instead of being walked by every later
  full collection.

Frozen objects are still freed by reference counting when they die; only
objects in a reference cycle that die after being frozen wait for the next
:func:`gc.unfreeze`. A session that opened and closed normally leaves no
cycle (``tests/test_gateway_hostile.py`` checks it with the collector
disabled), but one whose generation was cancelled by a disconnect does (the
task, its CancelledError's traceback and the frames it holds). So the tuner
also sweeps: unfreeze, collect everything once, freeze again. That full
collection is the pause freezing avoids (measured: 0.45 s with 10 000
sessions open, 1.3 million frozen objects), so it is amortised the way
CPython amortises its own full collections: a sweep follows once the connections closed since
the last one reach half of those open (and at least ``freeze_every``). What
frozen cycles can hold on to is thereby bounded by a fraction of what the
open sessions hold.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import time

__all__ = ["GC_THRESHOLDS", "GcTuner", "raise_fd_limit"]

log = logging.getLogger("ferrous.server")

# (generation 0, 1, 2): see the module docstring.
GC_THRESHOLDS = (50_000, 50, 100)

# Where the hard limit is "unlimited", the kernel still caps the soft limit at
# fs.nr_open (1048576 by default on Linux).
_UNLIMITED_CAP = 1 << 20


def raise_fd_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; (old soft limit, new soft limit).

    Failures are logged, never raised: a server that runs with the limit it
    was given is better than one that does not start.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        log.info("raised open-file limit from %d to %d", soft, target)
        return soft, target
    return soft, soft


class GcTuner:
    """Raised thresholds; a freeze after start-up and after bursts of accepts; sweeps after closes."""

    def __init__(self, freeze_every: int = 1000, delay: float = 1.0) -> None:
        self.freeze_every = freeze_every
        self.delay = delay  # let the burst finish: one freeze per burst, not per connection
        self.freezes = 0
        self.sweeps = 0
        self.last_sweep_ms = 0.0
        self._accepts = 0
        self._closes = 0
        self._open = 0  # connections open now (accepted and not yet closed)
        self._sweep = False
        self._pending: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """After start-up: raise the thresholds, collect what start-up left, freeze the rest."""
        gc.set_threshold(*GC_THRESHOLDS)
        self._sweep = True  # a full collection once, while nothing is waiting on the loop
        self._run()
        self.sweeps = 0

    def note_accept(self) -> None:
        """One more accepted connection; a freeze follows ``freeze_every`` of them."""
        self._accepts += 1
        self._open += 1
        if self._accepts >= self.freeze_every:
            self._schedule()

    def note_close(self) -> None:
        """One more closed connection; a sweep follows enough of them (see the module doc)."""
        self._closes += 1
        self._open = max(0, self._open - 1)
        if self._closes >= max(self.freeze_every, self._open // 2):
            self._sweep = True
            self._schedule()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _schedule(self) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self.delay, self._run)

    def _run(self) -> None:
        self._pending = None
        t0 = time.perf_counter()
        if self._sweep:
            gc.unfreeze()  # frozen objects that died in cycles become collectable
            gc.collect()
            self.sweeps += 1
        # After a burst, no collection first: it would walk every object the burst made
        # (~200 per session, 0.1-0.3 s per 1000 sessions), which is the pause this avoids.
        # Cyclic garbage frozen with them waits for the next sweep.
        gc.freeze()
        self.freezes += 1
        elapsed = (time.perf_counter() - t0) * 1000
        kind = "sweep" if self._sweep else "freeze"
        if self._sweep:
            self.last_sweep_ms = elapsed
        log.debug("gc %s: %.1f ms, %d objects frozen", kind, elapsed, gc.get_freeze_count())
        self._accepts = 0
        if self._sweep:
            self._closes = 0
        self._sweep = False
