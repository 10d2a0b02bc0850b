"""Reading finished chats' anticipated tokens into their windows (engine.readahead).

One ``llama_decode`` takes every idle window's anticipated tokens that fit
the batch, no logits asked. The interrupt flag may stop it: llama.cpp then
drops what the interrupted micro-batch wrote, but a batch of several
sequences runs as several micro-batches and the finished ones keep their
cells, so every window is cut back to what its history says it holds. The
tokens stay anticipated for the next idle time unless the cache had no room
for them.
"""

from __future__ import annotations

from typing import Any

import llama_cpp

from engine.backends.llamaslots import Slot

__all__ = ["ahead_slots", "read_ahead"]

_STOPPED = 2  # llama_decode's return when the abort callback stopped it


def ahead_slots(slots: list[Slot]) -> list[Slot]:
    """Idle windows whose anticipated tokens still follow what they hold."""
    return [s for s in slots if s.ahead and not s.busy and len(s.history) == s.ahead_at]


def read_ahead(ctx: object, mem: object, batch: Any, n_batch: int, slots: list[Slot]) -> int:
    """Read what :func:`ahead_slots` may into their caches; how many tokens it read."""
    b = batch
    n = 0
    taken: list[Slot] = []
    for slot in ahead_slots(slots):
        if n + len(slot.ahead) > n_batch:
            continue
        for i, token in enumerate(slot.ahead):
            b.token[n] = token
            b.pos[n] = slot.ahead_at + i
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = slot.index
            b.logits[n] = 0
            n += 1
        taken.append(slot)
    if not taken:
        return 0
    b.n_tokens = n
    rc = llama_cpp.llama_decode(ctx, batch)
    for slot in taken:
        if rc == 0:
            slot.history.extend(slot.ahead)
            slot.ahead = []
            continue
        llama_cpp.llama_memory_seq_rm(mem, slot.index, len(slot.history), -1)
        if rc != _STOPPED:
            slot.ahead = []  # no room in the cache, or a failure: not again
    return n if rc == 0 else 0
