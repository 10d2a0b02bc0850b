"""What one decode step feeds: the worker-level half of scheduling, as a pure function.

Every step of a batching backend is one forward pass over a batch of tokens.
Which tokens go in decides both latencies a chat front-end feels:

* **inter-token latency** of running streams: a step that also reads a long
  prompt makes every running stream wait for it. So decoding sequences go
  first (one token each), and while any sequence is decoding, prompts get at
  most ``chunk`` tokens of the step (chunked prefill, as in vLLM and
  Sarathi-Serve): a running stream never waits for more than one chunk.
* **time to first token** of waiting ones: within the prompt budget, the
  prompt with the fewest tokens left goes first (shortest remaining first),
  higher priority classes before lower ones. A burst of eight questions then
  gets its first answers after one prompt's worth of work, not all eight's,
  and the median wait is about half of reading them all together. A prompt
  of a higher class than every decoding sequence gets a step of its own
  (its class only) once the rest of it fits in a chunk: the others wait one
  step no longer than a chunk, and it answers after its own prompt rather
  than after sixteen other streams' tokens as well. So does a prompt that
  paused another sequence to start (``urgent``: its tenant was below its
  fair share). A longer one goes first in each step's chunk until then.

Shortest-first alone could starve a long prompt behind a stream of short
ones, so a prompt passed over ``patience`` times in a row goes first.

When nothing is decoding, prompts may fill the whole batch: there is no
stream to keep waiting, and one big pass reads prompts fastest.

Pure: it sees counts, not tensors; :mod:`engine.backends.llamacpp` carries
the plan out and keeps each sequence's ``passed`` count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Want", "plan_step"]


class Want(NamedTuple):
    """One sequence's claim on the next step."""

    seq: int
    pending: int
    """Tokens it has to feed before it can sample: 1 when decoding, else the unread prompt."""
    decoding: bool
    priority: int = 0
    passed: int = 0
    """Steps in a row it wanted prompt tokens and got none."""
    urgent: bool = False
    """It paused another sequence to start (engine.preemption): its prompt goes first."""


def plan_step(
    wants: Sequence[Want], *, batch: int, chunk: int, patience: int = 8
) -> list[tuple[int, int]]:
    """``(seq, tokens to feed)`` for one step, in batch order (decoding sequences first).

    ``batch`` bounds the tokens of the step; ``chunk`` bounds the prompt tokens
    of a step in which some sequence decodes. Sequences not listed wait.
    """
    if batch < 1 or chunk < 1:
        raise ValueError("batch and chunk must be at least 1")
    plan: list[tuple[int, int]] = []
    decoding = [w for w in wants if w.decoding and w.pending > 0]
    readers = [w for w in wants if not w.decoding and w.pending > 0]
    top = max((w.priority for w in readers), default=None)
    ahead: list[Want] = []
    if top is not None and decoding and top > max(w.priority for w in decoding):
        # A prompt of a higher class than everything running: its first token
        # should come after its own prompt, not after other streams' tokens too.
        ahead = [w for w in readers if w.priority == top]
    elif decoding and any(w.urgent for w in readers):
        # Likewise for prompts that paused someone to start (a tenant below its
        # fair share): they were owed a slot, so they are owed a quick answer.
        ahead = [w for w in readers if w.urgent]
    if ahead and sum(w.pending for w in ahead) <= min(chunk, batch):
        # The step is theirs alone when it finishes them within one chunk: the
        # running streams wait one step no longer than a chunk. A longer prompt
        # is read a chunk per step beside them (it sorts first) until its rest
        # fits.
        decoding, readers = [], ahead
    for w in sorted(decoding, key=lambda w: -w.priority)[:batch]:
        plan.append((w.seq, 1))
    room = batch - len(plan)
    if plan:
        room = min(room, chunk)
    readers.sort(key=lambda w: (w.passed < patience, -w.priority, not w.urgent, w.pending, w.seq))
    for w in readers:
        if room <= 0:
            break
        take = min(w.pending, room)
        plan.append((w.seq, take))
        room -= take
    return plan
