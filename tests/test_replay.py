"""The replay buffer's rules, without sockets: what a resume gets back, and what is dropped."""

from __future__ import annotations

import pytest
from ferrous_client.resume import ACK_EVERY, ResumeState, may_resume
from hypothesis import given
from hypothesis import strategies as st

from gateway.replay import FINISHED_HARD, ReplayLog


def fill(log: ReplayLog[str], gen: str, sizes: list[int], *, final: bool = False) -> list[int]:
    ns = []
    for i, size in enumerate(sizes):
        n = log.next_number()
        log.add(n, gen, f"{gen}{n}", size, final=final and i == len(sizes) - 1)
        ns.append(n)
    return ns


def test_everything_after_last_comes_back_in_order_across_generations() -> None:
    log: ReplayLog[str] = ReplayLog(1000)
    for gen in ("a", "b", "a", "b"):
        fill(log, gen, [10])
    assert log.since(0) == ["a1", "b2", "a3", "b4"]
    assert log.since(2) == ["a3", "b4"]
    assert log.since(4) == []
    assert log.since(5) is None  # a message never sent


def test_a_running_generation_keeps_its_newest_bytes_and_raises_lost() -> None:
    log: ReplayLog[str] = ReplayLog(100)
    fill(log, "a", [40, 40, 40])  # 120 > 100: the first goes
    assert log.lost == 1
    assert log.since(1) == ["a2", "a3"]
    assert log.since(0) is None
    assert log.bytes == 80


def test_without_trimming_nothing_is_dropped_and_the_room_check_says_wait() -> None:
    log: ReplayLog[str] = ReplayLog(100)
    for _ in range(3):
        assert log.has_room("a") or log.bytes >= 100
        log.add(log.next_number(), "a", "x", 40, trim=False)
    assert not log.has_room("a")
    assert log.lost == 0 and len(log) == 3
    assert log.has_room("b")  # budgets are per generation


def test_finished_generations_share_one_budget_oldest_first() -> None:
    log: ReplayLog[str] = ReplayLog(100)
    fill(log, "a", [30, 30], final=True)
    fill(log, "b", [30, 30], final=True)  # a + b = 120 > 100: a goes whole
    assert log.lost == 2
    assert log.since(2) == ["b3", "b4"]
    assert log.generations() == ["b"]
    fill(log, "c", [500])  # a running one has its own budget
    assert log.since(2) == ["b3", "b4", "c5"]


def test_ack_frees_what_the_client_has() -> None:
    log: ReplayLog[str] = ReplayLog(1000)
    fill(log, "a", [10, 10])
    fill(log, "b", [10])
    fill(log, "a", [10], final=True)
    log.ack(3)
    assert log.bytes == 10 and log.since(3) == ["a4"]
    assert log.since(2) is None  # acked: the client said it had them
    log.ack(99)  # beyond what was sent: clamped
    assert log.bytes == 0 and len(log) == 0 and log.generations() == []
    assert log.since(4) == []


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(1, 60), st.booleans(), st.booleans()),
        max_size=80,
    ),
    st.integers(50, 200),
)
def test_what_comes_back_is_exactly_the_kept_suffix(
    ops: list[tuple[str, int, bool, bool]], budget: int
) -> None:
    """Whatever happens, since(last) is every message after last, or None: never a gap."""
    log: ReplayLog[str] = ReplayLog(budget)
    sent: list[str] = []
    done: set[str] = set()
    for gen, size, final, ack in ops:
        if gen in done:
            continue
        n = log.next_number()
        log.add(n, gen, f"{gen}{n}", size, final=final)
        sent.append(f"{gen}{n}")
        if final:
            done.add(gen)
        if ack and n > 3:
            log.ack(n - 3)
        assert log.bytes >= 0
    for last in range(len(sent) + 1):
        got = log.since(last)
        if got is not None:
            assert got == sent[last:]
        else:
            assert last < log.lost
    assert log.since(log.lost) == sent[log.lost :] if log.lost <= len(sent) else True


def test_an_error_then_a_done_end_one_generation_once() -> None:
    """An engine error is followed by the generation's done: two final messages, one end."""
    log: ReplayLog[str] = ReplayLog(100)
    for gen in ("a", "b"):
        fill(log, gen, [10])
        fill(log, gen, [10], final=True)  # the error
        fill(log, gen, [10], final=True)  # the done
    log.ack(log.last_n)
    assert log.bytes == 0 and log.generations() == []
    for gen in "cdefgh":  # more generations end and are trimmed: the books still balance
        fill(log, gen, [40], final=True)
    assert log.bytes <= 100 + 40 and log.since(log.lost) is not None


def test_while_nobody_reads_finished_generations_stay_up_to_the_hard_limit() -> None:
    log: ReplayLog[str] = ReplayLog(100)
    for gen in "abc":
        for _ in range(2):
            log.add(log.next_number(), gen, gen, 45, trim=False)
        log.add(log.next_number(), gen, gen, 5, final=True, trim=False)
    assert log.lost == 0 and log.since(0) is not None  # 3 x 95 bytes, over one budget
    for i in range(FINISHED_HARD * 2):
        log.add(log.next_number(), f"z{i}", "z", 100, final=True, trim=False)
    assert log.bytes <= FINISHED_HARD * 100 + 100 and log.lost > 0


def test_dropped_messages_do_not_pile_up_behind_a_kept_one() -> None:
    """One old message nobody acks stays at the head; what is dropped after it is freed."""
    log: ReplayLog[str] = ReplayLog(100)
    fill(log, "head", [1])
    for _ in range(10_000):
        fill(log, "a", [50])
    assert len(log) <= 3 and len(log._order) < 200


def test_replay_log_needs_a_budget() -> None:
    with pytest.raises(ValueError):
        ReplayLog(0)


def test_client_state_drops_repeats_and_acks_on_done_or_every_few() -> None:
    state = ResumeState()
    assert state.receive(1) and not state.receive(1)
    assert state.should_ack(ends_generation=True)
    for n in range(2, 2 + ACK_EVERY - 1):
        assert state.receive(n)
        assert not state.should_ack(ends_generation=False)
    assert state.receive(1 + ACK_EVERY) and state.should_ack(ends_generation=False)
    assert state.last == 1 + ACK_EVERY


def test_the_client_resumes_only_links_that_died_without_a_close_frame() -> None:
    assert may_resume(None)
    assert not any(may_resume(code) for code in (1000, 1001, 1008, 1011, 4000))
