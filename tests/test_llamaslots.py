"""Where a new sequence goes and what of its prompt a slot's cache holds (pure)."""

from __future__ import annotations

from engine.backends.llamaslots import REUSE_MIN, SHARE_MIN, Slot, common_prefix, pick_slot, spliced


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
