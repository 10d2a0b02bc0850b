"""The replay buffer's rules, without sockets: what a resume gets back, and what is dropped."""

from __future__ import annotations

import pytest
from ferrous_client.resume import ACK_EVERY, ResumeState, may_resume
from hypothesis import given
from hypothesis import strategies as st

from gateway.replay import ReplayLog


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
