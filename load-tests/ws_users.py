"""The WebSocket scenarios, one locust user class each: steady, burst, cancel and slow.

Each class's task carries its scenario's tag (``--tags``); the class names
can also be given on the command line. ``WsUser`` is their abstract base.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import ClassVar

from locust import User, between, constant, tag, task
from locust.env import Environment
from options import Settings
from prompts import PROMPTS
from reporting import Generation, LoadFailure, Reporter, ms
from websockets.exceptions import InvalidHandshake, InvalidState
from ws_client import Closed, WsSession, handshake_failure, io_failure, ws_url

from protocol import messages as m

_encodings = itertools.count()


class WsUser(User):
    """A WebSocket client that keeps one session open and reconnects when it breaks."""

    abstract = True
    scenario: ClassVar[str] = "ws"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = Settings.of(environment)
        enc = self.settings.encoding
        if enc == "both":
            enc = ("json", "msgpack")[next(_encodings) % 2]
        self.subprotocol = m.SUBPROTOCOL_MSGPACK if enc == "msgpack" else m.SUBPROTOCOL_JSON
        self.rep = Reporter(environment, f"ws-{enc}", self.scenario)
        self.session: WsSession | None = None

    def open_session(self) -> WsSession | None:
        """Connect and say hello, reporting ``connect`` and ``hello``; None when refused."""
        t0 = time.perf_counter()
        try:
            session = WsSession.open(ws_url(self.host or ""), self.settings, self.subprotocol)
        except (InvalidHandshake, OSError, Closed) as exc:
            self.rep.fire("connect", ms(time.perf_counter() - t0), failure=handshake_failure(exc))
            return None
        t1 = time.perf_counter()
        self.rep.fire("connect", ms(t1 - t0))
        try:
            session.hello(f"locust/{self.scenario}")
        except (LoadFailure, OSError, Closed, InvalidState) as exc:
            self.rep.fire("hello", ms(time.perf_counter() - t1), failure=io_failure(exc))
            session.close()
            return None
        self.rep.fire("hello", ms(time.perf_counter() - t1))
        return session

    def ensure_session(self) -> WsSession | None:
        if self.session is None:
            self.session = self.open_session()
            if self.session is None:
                time.sleep(1.0)  # refused: do not hammer the handshake in a tight loop
        return self.session

    def model(self, session: WsSession) -> str:
        if self.settings.model:
            return self.settings.model
        if session.ready and session.ready.models:
            return session.ready.models[0]
        raise LoadFailure("no model: pass --ferrous-model")

    def drop_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def after(self, gen: Generation) -> None:
        """Reconnect on the next task when the connection broke."""
        if gen.failure and (gen.failure.startswith("closed") or gen.failure == "timeout"):
            self.drop_session()

    def on_stop(self) -> None:
        self.drop_session()


class SteadyChatUser(WsUser):
    """Steady chat: multi-turn conversations with think time, as an interactive user would.

    Proves the everyday numbers: ttft and inter-token latency under a given
    number of concurrent people, with conversations kept on the server (each
    turn re-renders a growing history; after ``--ferrous-turns`` turns the
    conversation is forgotten and a new one starts).
    """

    scenario = "steady"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.conversation: str | None = None
        self.turn = 0

    def wait_time(self) -> float:
        return self.settings.think()

    @tag("steady", "mixed")
    @task
    def chat(self) -> None:
        session = self.ensure_session()
        if session is None:
            return
        if self.turn >= self.settings.turns and self.conversation:
            try:
                session.send(m.Forget(self.conversation))
            except (OSError, InvalidState):
                self.drop_session()
                return
            self.conversation, self.turn = None, 0
        request = m.Chat(
            id=session.new_id(),
            model=self.model(session),
            messages=[m.ChatMessage("user", random.choice(PROMPTS))],
            conversation=self.conversation,
            options=m.Options(max_tokens=self.settings.max_tokens),
        )
        gen, self.conversation = session.run(request)
        self.turn += 1
        gen.report(self.rep)
        self.after(gen)


class ConnectionBurstUser(WsUser):
    """Connection burst: connect, authenticate, hello, one short generation, disconnect.

    Spawned at a high rate (``-r`` close to ``-u``) this hammers the handshake
    and authentication path and session set-up/tear-down, which steady chat
    barely touches; ``connect`` and ``hello`` show their latency, and refusals
    (``handshake 503 overloaded`` at ``limits.max_sessions``) their count.
    """

    scenario = "burst"
    wait_time = constant(0)

    @tag("burst")
    @task
    def burst(self) -> None:
        session = self.open_session()
        if session is None:
            time.sleep(1.0)
            return
        try:
            request = m.Generate(
                id=session.new_id(),
                model=self.model(session),
                prompt=random.choice(PROMPTS),
                options=m.Options(max_tokens=8),
            )
            gen, _ = session.run(request)
            gen.report(self.rep, rate=False)
        finally:
            session.close()


class CancelStormUser(WsUser):
    """Cancel storm: every generation is cancelled at a random delta (0: before ``started``).

    Proves that cancellation is prompt and clean under load: each cancelled
    generation must end with exactly the ``done`` the protocol promises
    (``cancelled``). ``cancel cancelled`` times cancel → done, with the
    number of deltas that still arrived after the cancel as its response
    length; ``cancel late`` is the same for a generation that ended on its
    own (``length``) after the cancel was sent, the engine having finished
    before the cancel reached it; ``cancel finished first`` counts
    generations that ended before their cancel point. A cancel is never a
    failure here; a lost ``done`` is (``timeout``).
    """

    scenario = "cancel"
    wait_time = between(0.0, 0.2)

    @tag("cancel")
    @task
    def cancel(self) -> None:
        session = self.ensure_session()
        if session is None:
            return
        cancel_after = random.randint(0, max(0, self.settings.cancel_max))
        request = m.Generate(
            id=session.new_id(),
            model=self.model(session),
            prompt=random.choice(PROMPTS),
            options=m.Options(max_tokens=max(64, 4 * self.settings.cancel_max), ignore_eos=True),
        )
        gen, _ = session.run(request, cancel_after=cancel_after)
        gen.report(self.rep, expect_cancel=True, rate=False)
        if gen.failure is None and gen.finish in ("cancelled", "stop", "length"):
            if gen.cancelled_at is None:  # ended before its cancel point
                self.rep.fire("finished first", ms(gen.end - gen.sent))
            else:
                # "late": the cancel was sent, but the generation ended on its own
                # (the engine had produced everything before the cancel reached it).
                name = "cancelled" if gen.finish == "cancelled" else "late"
                self.rep.fire(name, ms(gen.end - gen.cancelled_at), gen.deltas_after_cancel)
        self.after(gen)


# -- slow reader ---------------------------------------------------------------------------


SLOW_RCVBUF = 4096  # bytes; the kernel may round it, but it stays far below the default


class SlowReaderUser(User):
    """Slow readers: a client that reads its generation at a few bytes per second.

    Nothing in the protocol stops a client from reading slowly; the server
    must then push back (the engine pauses the generation once its ring is
    full) rather than buffer without bound, must keep serving everyone else
    at full speed, and must end a generation stalled for longer than
    ``stall_timeout`` with ``finish_reason: "stalled"``. Each user shrinks its
    socket's receive buffer, reads ``--ferrous-slow-rate`` bytes/s for
    ``--ferrous-slow-seconds``, then drains the rest at full speed to see how
    the generation ended: ``slow finish stop|length|stalled`` (all expected
    outcomes for a slow reader, so not failures; ``error`` is one). Run it
    beside ``steady`` (``--tags slow steady``) to see whether the others' ttft
    and itl move, and watch the server's RSS.
    """

    wait_time = between(0.0, 0.5)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings = Settings.of(environment)
        self.rep = Reporter(environment, "ws-json", "slow")

    @tag("slow")
    @task
    def read_slowly(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        try:
            session = WsSession.open(
                ws_url(self.host or ""), s, m.SUBPROTOCOL_JSON, rcvbuf=SLOW_RCVBUF
            )
        except (InvalidHandshake, OSError, Closed) as exc:
            self.rep.fire("connect", ms(time.perf_counter() - t0), failure=handshake_failure(exc))
            time.sleep(1.0)
            return
        try:
            try:
                ready = session.hello("locust/slow")
            except (LoadFailure, OSError, Closed, InvalidState) as exc:
                self.rep.fire("connect", ms(time.perf_counter() - t0), failure=io_failure(exc))
                return
            self.rep.fire("connect", ms(time.perf_counter() - t0))
            self._generate(session, s.model or (ready.models[0] if ready.models else "missing"))
        finally:
            session.close()

    def _generate(self, session: WsSession, model: str) -> None:
        s = self.settings
        sent = time.perf_counter()
        first: float | None = None
        finish: str | None = None
        failure: str | None = None
        tick = 0.25
        slow_until = sent + s.slow_seconds
        deadline = slow_until + s.timeout
        try:
            session.send(
                m.Generate(
                    id="slow",
                    model=model,
                    prompt=random.choice(PROMPTS),
                    options=m.Options(max_tokens=s.slow_max_tokens, ignore_eos=True),
                )
            )
            while finish is None and failure is None:
                now = time.perf_counter()
                if now > deadline:
                    failure = "timeout"
                    break
                if now < slow_until:  # a trickle: rate * tick bytes, then sleep out the tick
                    session.conn.read(max(1, int(s.slow_rate * tick)), tick)
                    time.sleep(max(0.0, tick - (time.perf_counter() - now)))
                else:
                    session.conn.read(65536, max(0.01, deadline - now))
                for msg in session.pending():
                    if isinstance(msg, m.Delta) and first is None:
                        first = time.perf_counter()
                        self.rep.fire("ttfb", ms(first - sent))
                    elif isinstance(msg, m.Done):
                        finish = msg.finish_reason
                    elif isinstance(msg, m.Error):
                        failure = msg.code.value
        except (OSError, Closed, InvalidState) as exc:
            failure = io_failure(exc)
        if finish == "error":
            failure = failure or "finish error"
        self.rep.fire(
            "finish " + (finish or "none"),
            ms(time.perf_counter() - sent),
            session.conn.bytes_read,
            failure,
        )
