"""Reading a chat's next turn marker while the worker is idle.

A follow-up turn's first token costs reading everything the cache does not
hold: the end of the last answer, the template's turn change
(``<|im_end|>\\n<|im_start|>user\\n`` in ChatML), the new question and the
assistant header. Only the question is unknown before the user sends it;
the answer's last token (sampled but never fed back) and the turn change can
be read as soon as the answer ends. On two cores that is 6 of the ~18 tokens
a short follow-up reads (SmolLM2: ~25 ms of a ~100 ms first token), and a
person takes seconds to type the next question.

So when a chat answer ends normally (an end token or its token budget; not
a stop string, a tool call, an error or a cancel) the worker asks the
backend to :meth:`~engine.backends.base.TextGenerator.anticipate` those
tokens, and reads them when it has nothing else to do. The read is one
decode step the interrupt flag (engine.interrupt) stops: an
:class:`ArrivalWatch` raises the flag as soon as anything arrives from the
gateway, llama.cpp drops what the step wrote, and the request is served as
if nothing had been read ahead. Reading ahead never delays a request by more
than a graph node, and never runs while sequences or jobs do.

The turn change comes from the model's own template (:func:`turn_tokens`):
a conversation with marked contents is rendered and the text between the
assistant's answer and the next user message is tokenized, checked to
tokenize the same inside the whole prompt. A template that renders the turn
change differently in the real conversation costs only the wasted read:
reuse is decided token by token when the next prompt arrives.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator

from engine.backends.base import Backend, TextGenerator
from engine.backends.llamaslots import common_prefix
from engine.interrupt import Interrupt
from engine.prompts import tokenize_prompt
from engine.requests import ChatMessage, FinishReason
from engine.workerseq import WorkerSeq

__all__ = [
    "BUSY_MAX",
    "CHECK_S",
    "GIVE_UP_S",
    "MAX_TURN_TOKENS",
    "READ_AHEAD_MODES",
    "ArrivalWatch",
    "ReadAhead",
    "cpu_sample",
    "machine_busy",
    "turn_tokens",
]

READ_AHEAD_MODES = ("idle", "always", "off")
# Reading ahead waits for a machine whose other processes used less than BUSY_MAX of
# its CPU time over CHECK_S (a few ticks of the kernel's clock), for GIVE_UP_S at most.
CHECK_S = 0.1
BUSY_MAX = 0.25
GIVE_UP_S = 10.0
_TICK = os.sysconf("SC_CLK_TCK")

# A turn change longer than this is no marker (a template adding whole
# instructions between turns): nothing is read ahead for it.
MAX_TURN_TOKENS = 32

_USER, _ANSWER, _NEXT = "ferrous-q1", "ferrous-a1", "ferrous-q2"


def turn_tokens(backend: TextGenerator) -> list[int]:
    """The tokens ``backend``'s chat template puts between an assistant's answer and the
    next user message; empty when they cannot be told apart reliably."""
    try:
        text = backend.render_chat(
            [
                ChatMessage(role="user", content=_USER),
                ChatMessage(role="assistant", content=_ANSWER),
                ChatMessage(role="user", content=_NEXT),
            ]
        )
    except Exception:  # a template that refuses (or breaks on) a plain chat
        return []
    end = text.find(_ANSWER)
    start = text.find(_NEXT)
    if end < 0 or start < 0 or text.count(_ANSWER) != 1:
        return []
    end += len(_ANSWER)
    if start <= end:
        return []
    head = tokenize_prompt(backend, text[:end])
    upto = tokenize_prompt(backend, text[:start])
    whole = tokenize_prompt(backend, text)
    if whole[: len(head)] != head:
        return []  # the answer's last token merges with what follows: no clean cut
    # Only what the whole prompt spells the same way: a marker ending in a space
    # ("user: ") leaves that space to the question's first word.
    turn = whole[len(head) : common_prefix(upto, whole)]
    return turn if 0 < len(turn) <= MAX_TURN_TOKENS else []


class ArrivalWatch:
    """Raises the interrupt flag when the gateway's connection has something to read,
    while :meth:`armed`: a read-ahead step then stops within a graph node."""

    def __init__(self, sock: socket.socket, interrupt: Interrupt) -> None:
        self._sock = sock
        self._interrupt = interrupt
        self._r, self._w = os.pipe()

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        # The compute releases the GIL, so a thread blocked in select() sees an
        # arrival while the step runs; the pipe tells it the step is over.
        watcher = threading.Thread(target=self._watch, name="arrival-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            os.write(self._w, b"x")
            watcher.join()
            os.read(self._r, 64)

    def _watch(self) -> None:
        fd = self._sock.fileno()
        readable, _, _ = select.select([fd, self._r], [], [])
        if fd in readable:
            self._interrupt.set()

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def machine_busy(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """The share of the machine's CPU time other processes used between two samples
    (:func:`cpu_sample`): their busy time over all CPUs' time."""
    total = after[0] - before[0]
    if total <= 0:
        return 0.0
    busy = (total - (after[1] - before[1])) - (after[2] - before[2])
    return max(0.0, busy / total)


def cpu_sample() -> tuple[int, int, int] | None:
    """(all CPUs' time, their idle time, this process's time), in clock ticks; None
    where the system does not say (then the machine counts as idle)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu" or len(fields) < 6:
        return None
    ticks = [int(x) for x in fields[1:9]]
    own = os.times()
    return sum(ticks), ticks[3] + ticks[4], round((own.user + own.system) * _TICK)


class ReadAhead:
    """The worker's side: which ended sequences anticipate their next turn, when to read
    them, and the read, stopped by any arrival.

    With ``machine_idle`` the read also waits until the rest of the machine is
    quiet (:data:`CHECK_S` of CPU time sampled, others below :data:`BUSY_MAX`):
    llama.cpp's threads wait for each other at every graph node, so a read
    beside another busy process (a worker of another model, another server)
    slows both far more than its own cost, and a read that something keeps
    stopping would start over and over. It waits at most :data:`GIVE_UP_S`;
    a read stopped :data:`MAX_TRIES` times is dropped
    (engine.backends.llamaahead).
    """

    def __init__(self, sock: socket.socket, interrupt: Interrupt, *, machine_idle: bool) -> None:
        self._watch = ArrivalWatch(sock, interrupt)
        self._machine_idle = machine_idle
        self._turns: dict[TextGenerator, list[int]] = {}  # per loaded model
        self._sample: tuple[int, int, int] | None = None
        self._sampled_at = 0.0
        self._waiting_since: float | None = None
        self._broken = False
        self.tokens = 0  # read ahead so far

    def ended(self, seq: WorkerSeq, reason: FinishReason) -> None:
        """``seq`` ends for ``reason`` (its backend still holds it): anticipate its next
        turn if it was a chat answer that ended normally."""
        msg = seq.msg
        if (
            self._broken
            or reason not in (FinishReason.STOP, FinishReason.LENGTH)
            or not seq.started
            or seq.suspended
            or seq.stream.stopped  # a stop string: the chat goes on from other text
            or msg.messages is None
            or msg.tools  # a tool call: a tool's result comes next, not a user
            or any(m.images for m in msg.messages)
        ):
            return
        backend = seq.backend
        try:
            turn = self._turns.get(backend)
            if turn is None:
                turn = self._turns[backend] = turn_tokens(backend)
            if turn:
                backend.anticipate(seq.gen, turn)
        except Exception:  # an optimisation: never a reason for a generation to fail
            self._broken = True
            return
        self._waiting_since = None  # new work: the wait for a quiet machine starts again

    def reader(self, backends: Iterable[Backend]) -> TextGenerator | None:
        """The first of ``backends`` with a next turn to read ahead; None once reading
        ahead failed or waited too long for a quiet machine."""
        since = self._waiting_since
        if self._broken or (since is not None and time.monotonic() - since >= GIVE_UP_S):
            return None
        for backend in backends:
            if isinstance(backend, TextGenerator) and backend.reads_ahead():
                return backend
        return None

    def wait(self) -> float:
        """Seconds the worker may sleep before :meth:`may_read` is worth asking again."""
        if not self._machine_idle:
            return 0.0
        if self._sample is None:
            return 0.0
        return max(0.0, CHECK_S - (time.monotonic() - self._sampled_at))

    def may_read(self) -> bool:
        """Whether to read now: always, or once the machine was quiet for CHECK_S."""
        if not self._machine_idle:
            return True
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        if self._sample is None:
            self._sample, self._sampled_at = cpu_sample(), now
            return self._sample is None
        if now - self._sampled_at < CHECK_S:
            return False
        after = cpu_sample()
        quiet = after is None or machine_busy(self._sample, after) < BUSY_MAX
        self._sample, self._sampled_at = (None, 0.0) if quiet else (after, now)
        return quiet

    def read(self, backend: TextGenerator) -> None:
        try:
            with self._watch.armed():
                self.tokens += backend.read_ahead()
        except Exception:  # an optimisation: a failure turns it off, nothing else
            self._broken = True
        self._waiting_since = None

    def forget(self, backend: TextGenerator) -> None:
        self._turns.pop(backend, None)

    def close(self) -> None:
        self._watch.close()
