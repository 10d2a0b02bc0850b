"""A finished chat's next turn marker, read while the worker is idle (engine.readahead)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from engine import ChatMessage, EngineClient, EngineConfig, GenerateRequest, SamplingParams
from engine.backends.base import LoadParams
from engine.backends.llamaahead import MAX_TRIES
from engine.backends.llamacpp import LlamaCppBackend
from engine.backends.llamaslots import spliced
from engine.interrupt import Interrupt
from engine.readahead import ArrivalWatch, machine_busy, turn_tokens

from .conftest import collect

QUESTION = "What is the capital of France?"
FOLLOW_UP = "Why is it famous?"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=n)


def _chat(backend: LlamaCppBackend, *messages: ChatMessage) -> list[int]:
    return backend.tokenize(backend.render_chat(list(messages)))


def test_the_turn_marker_comes_from_the_models_template(smollm2: Path) -> None:
    backend = LlamaCppBackend.load(str(smollm2), LoadParams(n_threads=1, n_seq=2))
    try:
        # ChatML: the end of the answer, then the next user's header.
        marker = backend.tokenize("<|im_end|>\n<|im_start|>user\n", add_bos=False)
        assert turn_tokens(backend) == marker
        # The plain template's "\nuser: ": the space goes with the question's first word.
        backend.chat_template = None
        assert backend.detokenize(turn_tokens(backend)) == b"\nuser:"
        # A template that puts nothing between an answer and the next question.
        backend.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        assert turn_tokens(backend) == []
    finally:
        backend.free()


def test_control_tokens_never_splice_a_prompt() -> None:
    """Control tokens spell no bytes: a cached one must not stand in for anything."""
    spell = {1: b"<s>", 2: b"Q", 3: b"Par", 4: b"is", 5: b"Paris", 6: b"!", 8: b"", 9: b"\n"}
    # The answer "Paris" then the turn marker read ahead; the next turn spells "Par" + "is".
    history = [1, 2, 5, 8, 9]
    prompt = [1, 2, 3, 4, 8, 9, 6]
    assert spliced(history, prompt, spell.__getitem__, n_ctx=100) == ([1, 2, 5, 8, 9, 6], 5)
    # Where the prompt parts from the cache at a control token, nothing is spliced in.
    history = [1, 2, 8, 9, 5]
    prompt = [1, 2, 6, 8, 9]
    assert spliced(history, prompt, spell.__getitem__, n_ctx=100) == (prompt, 2)


def _answer_then_follow_up(smollm2: Path, read_ahead: bool) -> tuple[int, int, list[int]]:
    """(tokens read ahead, prompt tokens the follow-up reused, its greedy tokens)."""
    backend = LlamaCppBackend.load(str(smollm2), LoadParams(n_threads=1, n_seq=2))
    flag = Interrupt.create()
    backend.set_interrupt(flag.address)
    try:
        backend.start(0, _chat(backend, ChatMessage("user", QUESTION)), greedy(12))
        tokens: list[int] = []
        while len(tokens) < 12:
            token = backend.step([0])[0]
            if backend.is_end(token):
                break
            tokens.append(token)
        backend.anticipate(0, turn_tokens(backend))
        backend.finish(0)
        read = 0
        if read_ahead:
            assert backend.reads_ahead()
            flag.set()  # a request arrived: the read stops and keeps nothing
            assert backend.read_ahead() == 0
            assert backend.reads_ahead()  # still wanted for the next idle time
            flag.clear()
            read = backend.read_ahead()
            assert not backend.reads_ahead()
        answer = backend.detokenize(tokens).decode()
        follow = _chat(
            backend,
            ChatMessage("user", QUESTION),
            ChatMessage("assistant", answer),
            ChatMessage("user", FOLLOW_UP),
        )
        backend.start(1, follow, greedy(8))
        out = [backend.step([1])[1] for _ in range(8)]
        return read, backend.prompt_reused(1), out
    finally:
        backend.free()
        flag.close()


def test_a_finished_chat_reads_its_next_turn_marker_ahead(smollm2: Path) -> None:
    """The answer's last token and the turn marker are read after the answer: the next
    turn reuses them and answers exactly as without reading ahead."""
    read, reused, out = _answer_then_follow_up(smollm2, read_ahead=True)
    _, reused_before, out_before = _answer_then_follow_up(smollm2, read_ahead=False)
    assert read >= 5  # the five tokens of <|im_end|>\n<|im_start|>user\n, at least
    assert reused == reused_before + read
    assert out == out_before


def test_a_read_stopped_again_and_again_is_given_up(smollm2: Path) -> None:
    """Requests that keep arriving stop the read each time: after MAX_TRIES it is
    dropped, and the window still holds exactly its history."""
    backend = LlamaCppBackend.load(str(smollm2), LoadParams(n_threads=1, n_seq=2))
    flag = Interrupt.create()
    backend.set_interrupt(flag.address)
    try:
        prompt = _chat(backend, ChatMessage("user", QUESTION))
        backend.start(0, prompt, greedy(4))
        for _ in range(4):
            backend.step([0])
        backend.anticipate(0, turn_tokens(backend))
        backend.finish(0)
        flag.set()
        for _ in range(MAX_TRIES):
            assert backend.reads_ahead()
            assert backend.read_ahead() == 0
        assert not backend.reads_ahead()
        flag.clear()
        # The same chat again: everything its window holds is reused, and it decodes.
        backend.start(1, prompt, greedy(2))
        assert backend.prompt_reused(1) == len(prompt) - 1
        assert backend.step([1])
    finally:
        backend.free()
        flag.close()


def test_only_other_processes_busy_time_counts() -> None:
    # (all CPUs' ticks, idle ticks, this process's ticks)
    assert machine_busy((1000, 500, 10), (1200, 700, 10)) == 0.0  # all idle
    assert machine_busy((1000, 500, 10), (1200, 500, 210)) == 0.0  # only this process
    assert machine_busy((1000, 500, 10), (1200, 550, 60)) == 0.5  # others half the machine
    assert machine_busy((1000, 500, 10), (1000, 500, 10)) == 0.0  # no time passed


def test_arrivals_raise_the_interrupt_only_while_armed() -> None:
    ours, theirs = socket.socketpair()
    flag = Interrupt.create()
    watch = ArrivalWatch(ours, flag)
    try:
        with watch.armed():
            theirs.sendall(b"y")
            deadline = time.monotonic() + 30
            while not flag.is_set() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert flag.is_set()
        ours.recv(1)
        flag.clear()
        with watch.armed():  # nothing arrives: disarming ends the watch
            pass
        assert not flag.is_set()
    finally:
        watch.close()
        flag.close()
        ours.close()
        theirs.close()


async def test_a_follow_up_after_a_pause_reads_only_its_question(smollm2: Path) -> None:
    """Through a worker: once the answer is sent and nothing else runs, the worker reads
    the next turn's marker; the follow-up then reads its question and the assistant
    header, nothing of the template's turn change."""
    # "always": the test machine is never quiet (other tests run beside this one).
    config = EngineConfig(workers=1, threads_per_worker=1, seqs_per_worker=2, read_ahead="always")
    history = [ChatMessage("user", QUESTION)]
    async with EngineClient(config) as client:
        await client.load("m", smollm2)
        deltas, _ = await collect(
            client, GenerateRequest(model="m", messages=history, sampling=greedy(12))
        )
        history += [
            ChatMessage("assistant", "".join(d.text for d in deltas)),
            ChatMessage("user", FOLLOW_UP),
        ]
        # Each health ping stops a read in progress (it is tried again): ask seldom.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            (worker,) = (await client.health()).workers
            if worker.tokens_read_ahead:
                break
        assert worker.tokens_read_ahead >= 5
        _, done = await collect(
            client, GenerateRequest(model="m", messages=history, sampling=greedy(4))
        )
    backend = LlamaCppBackend.load(str(smollm2), LoadParams(n_threads=1, n_seq=1))
    try:
        rest = backend.tokenize(f"{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n", add_bos=False)
    finally:
        backend.free()
    assert done.usage.prompt_tokens - done.usage.cached_tokens == len(rest), done.usage
