"""The per-step batch plan (engine.stepplan): pure decisions, no model, no process."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.stepplan import Want, plan_step


def test_decoding_sequences_go_first_one_token_each() -> None:
    plan = plan_step([Want(1, 40, False), Want(2, 1, True), Want(3, 1, True)], batch=512, chunk=64)
    assert plan[:2] == [(2, 1), (3, 1)]
    assert plan[2] == (1, 40)


def test_prompts_take_at_most_a_chunk_while_anything_decodes() -> None:
    plan = plan_step([Want(1, 300, False), Want(2, 1, True)], batch=512, chunk=64)
    assert plan == [(2, 1), (1, 64)]


def test_with_nothing_decoding_prompts_fill_the_batch() -> None:
    plan = plan_step([Want(1, 300, False), Want(2, 400, False)], batch=512, chunk=64)
    assert plan == [(1, 300), (2, 212)]


def test_the_shortest_remaining_prompt_is_read_first() -> None:
    wants = [Want(1, 50, False), Want(2, 10, False), Want(3, 30, False), Want(9, 1, True)]
    plan = plan_step(wants, batch=512, chunk=45)
    assert plan == [(9, 1), (2, 10), (3, 30), (1, 5)]


def test_a_higher_priority_prompt_goes_before_a_shorter_one() -> None:
    wants = [
        Want(1, 10, False, priority=0),
        Want(2, 60, False, priority=5),
        Want(3, 1, True, priority=5),
    ]
    assert plan_step(wants, batch=512, chunk=64) == [(3, 1), (2, 60), (1, 4)]


def test_a_prompt_passed_over_too_often_goes_first() -> None:
    wants = [Want(1, 500, False, passed=8), Want(2, 10, False), Want(3, 1, True)]
    assert plan_step(wants, batch=512, chunk=64, patience=8) == [(3, 1), (1, 64)]
    # Below its patience it still waits for the short one.
    wants[0] = Want(1, 500, False, passed=7)
    assert plan_step(wants, batch=512, chunk=64, patience=8) == [(3, 1), (2, 10), (1, 54)]


def test_equal_prompts_go_in_arrival_order() -> None:
    wants = [Want(7, 20, False), Want(4, 20, False), Want(5, 20, False), Want(1, 1, True)]
    assert plan_step(wants, batch=512, chunk=40) == [(1, 1), (4, 20), (5, 20)]


def test_a_prompt_that_paused_someone_gets_the_step_alone() -> None:
    wants = [Want(1, 1, True), Want(2, 30, False, urgent=True), Want(3, 5, False)]
    assert plan_step(wants, batch=512, chunk=64) == [(2, 30)]


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_step([], batch=0, chunk=1)
    with pytest.raises(ValueError):
        plan_step([], batch=1, chunk=0)


wants_strategy = st.lists(
    st.builds(
        Want,
        seq=st.integers(0, 10_000),
        pending=st.integers(0, 2000),
        decoding=st.booleans(),
        priority=st.integers(-3, 3),
        passed=st.integers(0, 20),
    ),
    max_size=40,
    unique_by=lambda w: w.seq,
).map(lambda ws: [w._replace(pending=min(w.pending, 1)) if w.decoding else w for w in ws])


@given(wants_strategy, st.integers(1, 600), st.integers(1, 600))
def test_every_plan_respects_the_budgets(wants: list[Want], batch: int, chunk: int) -> None:
    plan = plan_step(wants, batch=batch, chunk=chunk)
    by_seq = {w.seq: w for w in wants}
    assert len({seq for seq, _ in plan}) == len(plan)  # each sequence once
    assert sum(take for _, take in plan) <= batch
    decodes = [seq for seq, _ in plan if by_seq[seq].decoding]
    prompt_tokens = sum(take for seq, take in plan if not by_seq[seq].decoding)
    if decodes:
        assert prompt_tokens <= chunk
    for seq, take in plan:
        assert 0 < take <= by_seq[seq].pending
    # Decoding sequences come before prompts, and none is left out while the batch has room.
    kinds = [by_seq[seq].decoding for seq, _ in plan]
    assert kinds == sorted(kinds, reverse=True)
    waiting_decodes = [w for w in wants if w.decoding and w.pending]
    readers = [w for w in wants if not w.decoding and w.pending]
    top = max((w.priority for w in readers), default=None)
    if waiting_decodes and not decodes:
        # A step of its own: for prompts above every running class (else those that
        # paused someone to start), only when it finishes them within one chunk.
        ahead = [w for w in readers if top > max(w.priority for w in waiting_decodes)]
        ahead = [w for w in ahead if w.priority == top] or [w for w in readers if w.urgent]
        assert ahead and sum(w.pending for w in ahead) <= min(chunk, batch)
        assert sorted(plan) == sorted((w.seq, w.pending) for w in ahead)
        return
    assert len(decodes) == min(len(waiting_decodes), batch)
    # Work is never left undone while there is budget for it.
    room = batch - len(decodes)
    if decodes:
        room = min(room, chunk)
    assert prompt_tokens == min(room, sum(w.pending for w in readers))


def test_a_long_prompt_above_every_running_class_never_stalls_the_streams() -> None:
    """A 4,000-token prompt of a higher class (or one that paused someone) is read a
    chunk per step beside the running streams, first in the chunk; only its last
    chunk gets a step of its own."""
    kinds: list[dict[str, object]] = [{"priority": 1}, {"urgent": True}]
    for kind in kinds:
        pending, skipped_in_a_row, worst = 4000, 0, 0
        plan: dict[int, int] = {}
        while pending > 0:
            wants = [Want(s, 1, True) for s in range(8)] + [
                Want(99, pending, False, **kind),  # type: ignore[arg-type]
                Want(98, 5, False),
            ]
            plan = dict(plan_step(wants, batch=512, chunk=64))
            skipped_in_a_row = 0 if 0 in plan else skipped_in_a_row + 1
            worst = max(worst, skipped_in_a_row)
            assert plan[99] == min(pending, 64)
            pending -= plan[99]
        assert worst == 1 and 0 not in plan  # the last chunk's step alone


def test_a_prompt_above_every_running_class_gets_the_step_alone() -> None:
    wants = [
        Want(1, 1, True),
        Want(2, 1, True),
        Want(3, 40, False, priority=5),
        Want(4, 10, False),
    ]
    assert plan_step(wants, batch=512, chunk=64) == [(3, 40)]
    # Once it decodes, everyone decodes together again.
    wants[2] = Want(3, 1, True, priority=5)
    assert plan_step(wants, batch=512, chunk=64) == [(3, 1), (1, 1), (2, 1), (4, 10)]
