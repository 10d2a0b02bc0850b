"""Where a new sequence goes and what of its prompt a slot's cache holds (pure)."""

from __future__ import annotations

from engine.backends.llamaslots import (
    PARK_MIN,
    REUSE_MIN,
    SHARE_MIN,
    Slot,
    common_prefix,
    park_target,
    pick_slot,
    spliced,
)


def _slots(*histories: list[int]) -> list[Slot]:
    out = []
    for i, h in enumerate(histories):
        s = Slot(i)
        s.history = h
        out.append(s)
    return out


def test_slots_are_packed_low_unless_a_cache_saves_enough() -> None:
    free = _slots([1] * 40, [9] * 5, [])
    # A shared system prompt (SHARE_MIN..REUSE_MIN tokens): the lowest free slot.
    assert pick_slot(free, [0, SHARE_MIN, 0], unified=False) is free[0]
    # A follow-up turn that saves REUSE_MIN tokens or more: its own slot.
    assert pick_slot(free, [0, REUSE_MIN, 0], unified=False) is free[1]
    # Unrelated to every cache: the emptiest, so finished conversations survive.
    assert pick_slot(free, [0, 0, 0], unified=False) is free[2]
    # One shared cache: place costs nothing, the longest prefix wins.
    assert pick_slot(free, [0, SHARE_MIN, 0], unified=True) is free[1]


def test_a_repeated_answer_reuses_the_models_own_tokens() -> None:
    spell = {1: b"<s>", 2: b"Q", 3: b"Par", 4: b"is", 5: b"Paris", 6: b"!", 7: b"?"}.__getitem__
    history = [1, 2, 3, 4]  # the model said "Par" + "is"
    prompt = [1, 2, 5, 6, 7]  # the next turn tokenizes the answer as "Paris"
    assert common_prefix(history, prompt) == 2
    assert spliced(history, prompt, spell, n_ctx=100) == ([1, 2, 3, 4, 6, 7], 4)
    # Different bytes: nothing changes.
    assert spliced(history, [1, 2, 7, 6], spell, n_ctx=100) == ([1, 2, 7, 6], 2)
    # Past the context: nothing changes either.
    assert spliced(history, prompt, spell, n_ctx=6) == (prompt, 2)


def test_a_history_about_to_be_overwritten_moves_to_the_oldest_free_slot() -> None:
    system = [1] * 20
    chat = system + [2] * REUSE_MIN  # a finished conversation in slot 0
    slots = _slots(chat, [], [3] * 30, [4] * 30)
    slots[0].used, slots[2].used, slots[3].used = 5, 2, 3
    prompt = [*system, 9, 9]  # a new chat sharing only the system prompt
    # An empty slot first, the highest: the low ones stay free for running sequences.
    assert park_target(slots, slots[0], len(system), prompt, set()) is slots[1]
    slots[1].history, slots[1].used = [5] * 10, 4
    # No empty slot: the one whose cache started longest ago.
    assert park_target(slots, slots[0], len(system), prompt, set()) is slots[2]
    # Busy, or kept for a suspended sequence: not a place.
    slots[2].busy = True
    assert park_target(slots, slots[0], len(system), prompt, {3}) is slots[1]
    # A cache newer than this one is not given up for it.
    slots[1].used = 9
    assert park_target(slots, slots[0], len(system), prompt, {3}) is None


def test_a_history_is_moved_only_when_worth_it_and_not_held_elsewhere() -> None:
    system = [1] * 20
    slots = _slots(system + [2] * (PARK_MIN - 1), [])
    prompt = [*system, 9]
    # Fewer than PARK_MIN tokens that the new prompt will not keep: not worth a copy.
    assert park_target(slots, slots[0], len(system), prompt, set()) is None
    slots[0].history = system + [2] * PARK_MIN
    assert park_target(slots, slots[0], len(system), prompt, set()) is slots[1]
    # The new prompt keeps it all (a follow-up turn in its own slot): nothing to move.
    assert park_target(slots, slots[0], len(slots[0].history), prompt, set()) is None
    # Another slot holds it already (it was borrowed from there): nothing to move.
    slots[1].history = list(slots[0].history)
    assert park_target([*slots, Slot(2)], slots[0], len(system), prompt, set()) is None
