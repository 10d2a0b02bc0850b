"""Which queued sequences a worker starts, and which running one a newcomer may pause.

The worker's side of admission (the gateway's scheduler decides who is sent
here, and when; :mod:`engine.admission`). A model's queue is taken in order
while its backend has a free sequence and room for the next prompt. When it
has neither, the newcomer may pause a running sequence that
:func:`engine.preemption.victim` names (a lower class, or a tenant over its
share); the paused one keeps its place and resumes, oldest first, as soon as
room comes back, without losing or repeating a token.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from engine.backends import Backend, TextGenerator
from engine.preemption import Runner, victim
from engine.workerseq import WorkerSeq
from protocol.errors import BadRequest

__all__ = ["admissible", "admit", "resume_suspended"]

Fail = Callable[[WorkerSeq, Exception], None]


def admissible(
    models: Mapping[str, tuple[Backend, float]],
    queued: Mapping[str, deque[WorkerSeq]],
    running: Mapping[int, WorkerSeq],
) -> bool:
    """True when a queued sequence can start, or a suspended one resume."""
    for model, (backend, _) in models.items():
        if not isinstance(backend, TextGenerator):
            continue  # it only embeds: no sequence is ever queued for it
        queue = queued.get(model)
        mine = [s for s in running.values() if s.model == model]
        active = [s for s in mine if not s.suspended]
        if not (len(active) < len(mine) or queue):
            continue
        if len(active) < backend.max_sequences and backend.has_room(
            len(queue[0].prompt) if queue else 0
        ):
            return True
        if queue and backend.can_suspend and _victim(active, queue[0]) is not None:
            return True
    return False


def _victim(active: list[WorkerSeq], arrival: WorkerSeq) -> WorkerSeq | None:
    """The running sequence ``arrival`` may pause (engine.preemption), if any."""
    chosen = victim(
        [Runner(s.gen, s.msg.tenant, s.msg.priority, s.order) for s in active],
        Runner(arrival.gen, arrival.msg.tenant, arrival.msg.priority, 0),
    )
    return None if chosen is None else next(s for s in active if s.gen == chosen.key)


def admit(
    queued: Mapping[str, deque[WorkerSeq]],
    running: dict[int, WorkerSeq],
    order: Iterator[int],
    fail: Fail,
) -> None:
    """Start queued sequences while their backends have room, pausing one for another
    where :func:`_victim` allows; a start that raises fails that sequence alone."""
    for model, queue in queued.items():
        if not queue:
            continue
        backend = queue[0].backend
        active = [s for s in running.values() if s.model == model and not s.suspended]
        while queue:
            urgent = False
            if len(active) >= backend.max_sequences or not backend.has_room(len(queue[0].prompt)):
                # No room: the newcomer may pause a running sequence (a lower
                # class, or a tenant over its share), else it waits.
                paused = _victim(active, queue[0]) if backend.can_suspend else None
                if paused is None:
                    break
                backend.suspend(paused.gen)
                paused.suspended = True
                active.remove(paused)
                urgent = True
            seq = queue.popleft()
            seq.t_start = time.perf_counter()
            seq.n_prompt = len(seq.prompt)
            try:
                if seq.msg.adapters:
                    if not backend.supports_adapters:
                        raise BadRequest(f"the {backend.name} backend does not take adapters")
                    # Only backends that say so take the argument (supports_adapters).
                    cast(Any, backend).start(
                        seq.gen,
                        seq.prompt,
                        seq.msg.sampling,
                        seq.msg.priority,
                        urgent,
                        adapters=seq.msg.adapters,
                    )
                else:
                    backend.start(seq.gen, seq.prompt, seq.msg.sampling, seq.msg.priority, urgent)
            except Exception as exc:
                fail(seq, exc)
                continue
            seq.started = True
            seq.order = next(order)
            running[seq.gen] = seq
            active.append(seq)


def resume_suspended(running: Mapping[int, WorkerSeq], fail: Fail) -> None:
    """Suspended sequences continue, oldest first, as slots free up."""
    for seq in sorted((s for s in running.values() if s.suspended), key=lambda s: s.order):
        backend = seq.backend
        busy = sum(1 for s in running.values() if s.model == seq.model and not s.suspended)
        if busy >= backend.max_sequences or not backend.has_room(0):
            continue
        try:
            backend.resume(seq.gen)
        except Exception as exc:
            fail(seq, exc)
            continue
        seq.suspended = False
