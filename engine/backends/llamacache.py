"""The sequence windows of one llama.cpp context, and what each window's cache holds.

A llama.cpp context of the backend holds ``n_seq`` sequences, each in a
window of its own (or, unified, all in one shared cache). A window keeps its
cache after its sequence ends, so a conversation's next turn, or another chat
opening with the same system prompt, reads only what is new. This module
carries out what :mod:`engine.backends.llamaslots` decides (which window a
sequence takes, whose cache moves where) with llama.cpp's memory calls: it
trims, copies and drops caches and keeps each :class:`Slot`'s token list equal
to what its window holds. The batch stepping stays in
:mod:`engine.backends.llamacpp`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import llama_cpp

from engine.backends.llamalora import LoraKey
from engine.backends.llamaslots import (
    BORROW_MIN,
    BORROW_SPAN,
    Slot,
    common_prefix,
    park_target,
    pick_slot,
    spliced,
)

__all__ = ["SlotCaches"]

# The most memory kept for moving caches between windows while idle.
_KEEP_STATE_BUF = 64 << 20


class SlotCaches:
    """The windows of one context: which are busy, and the tokens each one's cache holds."""

    def __init__(self, ctx: object, n_seq: int, unified: bool) -> None:
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._unified = unified
        self.slots = [Slot(i) for i in range(n_seq)]
        self._starts = 0  # sequences started: each slot's ``used`` is one of these
        self._state_buf = bytearray()  # a sequence's cache in transit between windows

    def any_free(self) -> bool:
        return any(not s.busy for s in self.slots)

    def place(
        self,
        prompt: list[int],
        cache: LoraKey,
        held: list[Slot],
        spell: Callable[[int], bytes],
        n_ctx: int,
    ) -> tuple[Slot, list[int], int]:
        """A window for a new sequence reading ``prompt`` under ``cache`` (its adapters).

        Returns the window (now busy), the prompt to feed from its start (the
        cached answer's own tokens spliced in where they spell the same text,
        engine.backends.llamaslots.spliced) and how many of its first tokens
        the window already holds. ``held`` are windows kept for suspended
        sequences: taken only when nothing else is free.
        """
        free = [s for s in self.slots if not s.busy]
        if not free:
            raise RuntimeError("no free sequence slot")
        kept = {id(s) for s in held}
        free = [s for s in free if id(s) not in kept] or free
        # A cache computed under other adapters is of no use to this prompt.
        fits = [spliced(x.history if x.lora == cache else [], prompt, spell, n_ctx) for x in free]
        slot = pick_slot(free, [n for _, n in fits], self._unified)
        joined, same = fits[free.index(slot)]
        if same:
            prompt = joined
        if slot.lora == cache:
            target = park_target(self.slots, slot, same, prompt, {s.index for s in held})
            if target is not None and self._copy(slot, target, len(slot.history)):
                target.used = slot.used
        self._starts += 1
        slot.used = self._starts
        self._retag(slot, cache)
        same = self._borrow(slot, prompt, same)
        keep = self._trim(slot, min(same, len(prompt) - 1))  # read one token at least
        slot.busy = True
        return slot, prompt, keep

    def reclaim(self, tokens: list[int], cache: LoraKey, old: Slot) -> tuple[Slot, int]:
        """A window for a suspended sequence to go on in, and how much of ``tokens`` (what
        it had read, then what it still has to feed) the window holds.

        Its old window, when no one took it, still holds its whole cache.
        """
        free = [s for s in self.slots if not s.busy]
        if not free:
            raise RuntimeError("no free sequence slot to resume in")
        counts = [common_prefix(x.history if x.lora == cache else [], tokens) for x in free]
        best = max(range(len(free)), key=lambda i: (counts[i], free[i] is old))
        slot = free[best]
        self._retag(slot, cache)
        keep = self._trim(slot, min(self._borrow(slot, tokens, counts[best]), len(tokens) - 1))
        slot.busy = True
        return slot, keep

    def drop(self, slot: Slot) -> None:
        """Forget all of ``slot``'s cache."""
        llama_cpp.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
        slot.history = []
        slot.ahead = []

    def release_idle(self) -> bool:
        """Drop the caches of idle windows; True if that freed anything."""
        freed = False
        for slot in self.slots:
            if not slot.busy and slot.history:
                self.drop(slot)
                freed = True
        return freed

    def _trim(self, slot: Slot, keep: int) -> int:
        """Cut ``slot``'s cache back to its first ``keep`` tokens; how many it keeps."""
        if not llama_cpp.llama_memory_seq_rm(self._mem, slot.index, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
            keep = 0
        del slot.history[keep:]
        slot.ahead = []
        return keep

    def _retag(self, slot: Slot, cache: LoraKey) -> None:
        """Give ``slot`` to a sequence under ``cache``: a cache made under others goes."""
        if slot.lora != cache:
            self.drop(slot)
            slot.lora = cache

    def _borrow(self, slot: Slot, prompt: list[int], same: int) -> int:
        """Give ``slot`` the longest prefix of ``prompt`` any other window holds; the
        tokens it now has.

        Chats through one server mostly begin alike (the same system prompt,
        the same instructions): a burst of eight questions shares ~25 of each
        prompt's ~40 tokens. Reading a prompt costs ~4 ms a token on two cores;
        copying a sequence's cache costs ~20 us a token. So when another
        window, busy or not, holds ``BORROW_MIN`` more of this prompt than
        ``slot`` does, its cache is copied over (the whole sequence: llama.cpp
        copies no less between windows) and cut back to the shared part. In
        one shared cache the cells are shared instead, which copies nothing.
        """
        donor, most = None, same
        for other in self.slots:
            if other is slot or len(other.history) <= most or other.lora != slot.lora:
                continue
            n = common_prefix(other.history, prompt)
            # A donor far longer than what it shares costs more to copy than it saves.
            if n >= most + BORROW_MIN and len(other.history) <= n * BORROW_SPAN:
                donor, most = other, n
        if donor is None:
            return same
        return self._copy(donor, slot, most)

    def _copy(self, src: Slot, dst: Slot, n: int) -> int:
        """Make ``dst`` hold the first ``n`` tokens of ``src``'s cache; how many it holds."""
        llama_cpp.llama_memory_seq_rm(self._mem, dst.index, -1, -1)
        if self._unified:
            llama_cpp.llama_memory_seq_cp(self._mem, src.index, dst.index, 0, n)
        else:
            size = llama_cpp.llama_state_seq_get_size(self._ctx, src.index)
            if len(self._state_buf) < size:
                # Kept between copies (no allocating and zeroing each time: a third
                # of a copy's cost), unless it would hold much memory idle.
                self._state_buf = bytearray(size)
            buf = (ctypes.c_uint8 * size).from_buffer(self._state_buf)
            wrote = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, src.index)
            moved = bool(wrote) and (
                llama_cpp.llama_state_seq_set_data(self._ctx, buf, wrote, dst.index) == wrote
            )
            if len(self._state_buf) > _KEEP_STATE_BUF:
                self._state_buf = bytearray()
            if not moved:
                self.drop(dst)
                return 0
            llama_cpp.llama_memory_seq_rm(self._mem, dst.index, n, -1)
        dst.history = src.history[:n]
        dst.lora = src.lora
        dst.ahead = []
        return n
