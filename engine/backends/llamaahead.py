"""Reading finished chats' anticipated tokens into their windows (engine.readahead).

One ``llama_decode`` reads one idle window's anticipated tokens (a few:
~20 ms on two cores), no logits asked; the worker asks again for the next
window, so that each read stays short and another look at the machine comes
between two (engine.readahead). The interrupt flag may stop it: llama.cpp
then drops what the interrupted micro-batch wrote (with several sequences in
one batch, the finished micro-batches would keep their cells, so the window
is cut back to what its history says it holds in any case). The
tokens stay anticipated for the next idle time unless the cache had no room
for them or they were stopped :data:`MAX_TRIES` times.
"""

from __future__ import annotations

from typing import Any

import llama_cpp

from engine.backends.llamaslots import Slot

__all__ = ["MAX_TRIES", "ahead_slots", "read_ahead"]

_STOPPED = 2  # llama_decode's return when the abort callback stopped it
# A read stopped this many times (requests keep arriving) is given up: each try
# is work thrown away.
MAX_TRIES = 3


def ahead_slots(slots: list[Slot]) -> list[Slot]:
    """Idle windows whose anticipated tokens still follow what they hold."""
    return [s for s in slots if s.ahead and not s.busy and len(s.history) == s.ahead_at]


def read_ahead(ctx: object, mem: object, batch: Any, n_batch: int, slots: list[Slot]) -> int:
    """Read the first of :func:`ahead_slots` into its cache; how many tokens it read."""
    waiting = ahead_slots(slots)
    if not waiting:
        return 0
    slot = waiting[0]
    if len(slot.ahead) > n_batch:
        slot.ahead = []
        return 0
    for i, token in enumerate(slot.ahead):
        batch.token[i] = token
        batch.pos[i] = slot.ahead_at + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot.index
        batch.logits[i] = 0
    batch.n_tokens = n = len(slot.ahead)
    rc = llama_cpp.llama_decode(ctx, batch)
    if rc == 0:
        slot.history.extend(slot.ahead)
        slot.ahead = []
        return n
    if not llama_cpp.llama_memory_seq_rm(mem, slot.index, len(slot.history), -1):
        # A cache that cannot lose its last positions (a recurrent model's state):
        # it no longer matches its history, so it goes.
        llama_cpp.llama_memory_seq_rm(mem, slot.index, -1, -1)
        slot.history = []
        slot.ahead = []
        return 0
    slot.ahead_tries += 1
    if rc != _STOPPED or slot.ahead_tries >= MAX_TRIES:
        slot.ahead = []  # no room in the cache, a failure, or stopped too often
    return 0
