"""When a new request may pause a running one: the preemption rule, as a pure function.

Sequence slots are few and generations long. Without preemption a request
that arrives when every slot is busy waits for some running generation to
end, whatever its priority or tenant: behind a flood of long generations from
one tenant, another tenant's short question waits seconds. So an arrival may
pause a running sequence (engine.worker suspends it; its tokens and, usually,
its cache are kept, and it resumes where it stopped) when

1. it has a higher priority class than some running sequence: the lowest
   class pays, its most recently started sequence first; or
2. within its class, its tenant runs fewer sequences than another tenant by
   more than one: the tenant holding the most pays, most recent first. That
   is a fair share of the slots between the tenants that want them, reached
   one arrival at a time.

The same rule runs in the gateway (whether to hand a worker one request more
than it has slots, counting paused ones as running) and in the worker (which
sequence to pause), so they agree without talking.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Runner", "interrupts", "victim"]


class Runner(NamedTuple):
    """A running (or arriving) sequence as the rule sees it."""

    key: int  # who it is (the caller's id)
    tenant: str
    priority: int
    order: int  # when it started; later starts have larger numbers


def victim(running: Sequence[Runner], arrival: Runner) -> Runner | None:
    """The running sequence ``arrival`` may pause, or None when it must wait its turn."""
    if not running:
        return None
    lowest = min(r.priority for r in running)
    if lowest < arrival.priority:
        return max((r for r in running if r.priority == lowest), key=lambda r: r.order)
    peers = [r for r in running if r.priority == arrival.priority]
    if not peers:
        return None
    counts = Counter(r.tenant for r in peers)
    mine = counts.get(arrival.tenant, 0)
    most = max(counts.values())
    if most <= mine + 1:
        return None
    # Several tenants may hold the most: the one whose latest start is latest pays.
    heavy = {t for t, n in counts.items() if n == most and t != arrival.tenant}
    return max((r for r in peers if r.tenant in heavy), key=lambda r: r.order)


def interrupts(running: Sequence[Runner], arrival: Runner, slots: int) -> bool:
    """Whether ``arrival`` should cut its worker's step in progress short (engine.interrupt).

    Those the worker reads before anything else: a class above everything
    running (its prompt gets a step of its own, engine.stepplan), and one that
    finds every slot taken and may pause someone. Anyone else waits for the
    step, as its prompt would only join the next one.
    """
    if not running:
        return False
    if arrival.priority > max(r.priority for r in running):
        return True
    return len(running) >= slots and victim(running, arrival) is not None
