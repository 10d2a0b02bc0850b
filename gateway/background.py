"""Stopping a background task for certain.

A task that awaits a client library (a Redis command in flight, for one) may
have its cancellation taken by that library, which retries the command and
carries on: awaiting such a task after ``cancel()`` can wait forever, and a
server that waits for it never shuts down. :func:`stop` cancels, waits a
bounded time, and cancels again (the second lands in the task's own next
wait); what still runs after that is logged and left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

__all__ = ["stop"]

log = logging.getLogger("ferrous.gateway")


async def stop(
    task: asyncio.Task[object] | asyncio.Task[None] | None, timeout: float = 2.0
) -> None:
    """Cancel ``task`` and wait until it ended, at most twice ``timeout`` seconds."""
    if task is None:
        return
    for _ in range(2):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        log.warning("task %s did not stop when cancelled", task.get_name())
        return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
