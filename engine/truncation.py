"""Which messages of a long conversation to drop so its prompt fits: decided in linear time.

The policy is unchanged: drop the oldest messages that are not system
messages, never the last one (the turn being answered), until the rendered
prompt fits. Rendering and tokenizing the whole list once per dropped message
made that quadratic (512 messages of 2,000 characters: ~15 s in a worker, with
everyone else's requests waiting). Instead each message's own token count is
computed once, and :func:`estimated_cut` finds the cut from those counts
without rendering. The estimate never undercounts what the template adds per
message, so the cut it proposes fits in practice; :func:`settle_cut` then
confirms it with real renders of prompts no larger than the context window
and moves it by a message or two if the template's own tokens make the
estimate off. This module is pure: the caller supplies the render.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from itertools import accumulate

from protocol.errors import TooLarge

__all__ = ["droppable", "estimated_cut", "settle_cut"]


def droppable(roles: Sequence[str]) -> list[int]:
    """Indices of the messages truncation may drop, oldest first."""
    return [i for i, role in enumerate(roles[:-1]) if role != "system"]


def estimated_cut(full_tokens: int, costs: Sequence[int], limit: int) -> int:
    """The fewest droppable messages (oldest first) to drop so the prompt fits ``limit``.

    ``full_tokens`` is the rendered prompt with every message; ``costs`` the
    token count of each droppable message's text, oldest first. Dropping one
    removes at least its text's tokens (and the template's tokens around it),
    so ``full_tokens - sum(costs[:k])`` bounds the prompt after dropping
    ``k`` from above. Returns ``len(costs)`` when even dropping all does not
    fit by this estimate.
    """
    if full_tokens <= limit:
        return 0
    for k, dropped in enumerate(accumulate(costs), start=1):
        if full_tokens - dropped <= limit:
            return k
    return len(costs)


def settle_cut(
    start: int, most: int, fits: Callable[[int], bool], *, deadline: float | None = None
) -> int:
    """The fewest drops in ``0..most`` for which ``fits`` holds, searched from ``start``.

    ``fits(k)`` renders and tokenizes the prompt without the first ``k``
    droppable messages. From an estimate that fits, it steps down while one
    message fewer still fits; from one that does not, it steps up. Each call
    past ``deadline`` (a ``time.perf_counter`` value) raises TooLarge.
    Returns ``most`` when nothing fits (the caller then reports the size).
    """

    def check(k: int) -> bool:
        if deadline is not None and time.perf_counter() > deadline:
            raise TooLarge(
                "preparing the prompt took too long: send a shorter conversation "
                "or fewer, smaller messages"
            )
        return fits(k)

    if check(start):
        # Gallop down (1, 2, 4… fewer messages dropped), then bisect: O(log n) renders,
        # none much larger than twice the context window.
        good, bad, step, galloping = start, -1, 1, True
        while good - bad > 1:
            if galloping:
                probe = max(good - step, bad + 1)
                step *= 2
            else:
                probe = (good + bad) // 2
            if check(probe):
                good = probe
            else:
                bad, galloping = probe, False
        return good
    k = start
    while k < most:
        k += 1
        if check(k):
            return k
    return most
