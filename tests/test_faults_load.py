"""Faults under load: a worker killed or stopped, the server out of file descriptors, the
gateway killed and restarted, each while several WebSocket sessions generate continuously.

Everything is real: the gateway on a loopback port (in this process, or ``ferrous serve``
as a subprocess where the fault needs a process of its own), worker processes, POSIX
signals, resource limits. Each test asserts what the clients saw, prints how long the
service took to be whole again (lines starting with ``RECOVERY``, to be copied into a
report; run with ``-s`` to see them), and checks that nothing leaked: no ring segment
in /dev/shm, no worker process, the test process's fd count back to its baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import resource
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil
from ferrous_client import Backoff, ConnectionLost, FerrousClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage
from websockets.typing import Subprotocol

from engine import EngineClient, EngineConfig, GenerateRequest, GenerationDone
from engine.rings import SHM_DIR, SHM_PREFIX
from gateway.config import LimitsConfig, ServerConfig
from gateway.server import RunningServer
from protocol import messages as m
from protocol.errors import ErrorCode

from .conftest import ring_segments
from .gateway_helpers import (
    JSON,
    Client,
    free_port,
    gateway,
    serve_command,
    server_config,
    stop_process,
)

SESSIONS = 4
# Long enough that no generation ends between the snapshot of who runs where and the
# signal (the slow model decodes a token in a few ms; 4 streams share 2 cores).
LONG = 300
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}


def _options(max_tokens: int) -> m.Options:
    return m.Options(max_tokens=max_tokens, **GREEDY)  # type: ignore[arg-type]


def _fds() -> int:
    return int(psutil.Process().num_fds())


def _worker_procs(root: int | None = None) -> list[psutil.Process]:
    """Live worker processes (``python -m engine.worker``) below ``root`` (this process)."""
    parent = psutil.Process(root or os.getpid())
    found = []
    for p in parent.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "engine.worker" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def _segments_of(pid: int) -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}{pid}-*")}


async def _until(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll ``check`` every 20 ms; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def _report(label: str, seconds: float) -> None:
    print(f"\nRECOVERY {label}: {seconds:.3f} s", flush=True)


@contextlib.contextmanager
def _no_leaks() -> Iterator[None]:
    """No ring segment, no worker process, and the test process's fds back to baseline."""
    fds_before = _fds()
    assert ring_segments() == set()
    yield
    assert ring_segments() == set(), "a shared-memory ring was left behind"
    assert _worker_procs() == [], "a worker process outlived the server"
    # Closed transports release their fds from loop callbacks: give them a moment.
    deadline = time.monotonic() + 5
    while _fds() > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds() <= fds_before, f"fds: {fds_before} before, {_fds()} after"


# -- a steady load of WebSocket sessions against an in-process server ---------------------


@dataclass
class Gen:
    """One generation as a load session saw it (``worker``: pid serving it, at its first delta)."""

    session: int
    id: str
    sent: float
    worker: int = 0
    deltas: int = 0
    first_delta: float = 0.0
    ended: float = 0.0
    finish: str | None = None
    tokens: int = 0  # completion tokens, from the done
    error: m.Error | None = None


@dataclass
class Load:
    """``SESSIONS`` sessions, each generating ``LONG``-token answers back to back until stopped."""

    running: RunningServer
    token: str
    model: str = "slow"
    gens: list[Gen] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._session(i)) for i in range(SESSIONS)]

    async def _session(self, i: int) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with connect(
            self.running.ws_url,
            subprotocols=[Subprotocol(m.SUBPROTOCOL_JSON)],
            additional_headers=headers,
        ) as ws:
            c = Client(ws, JSON)
            await c.hello()
            placements = self.running.gateway.engine.placements
            while not self.stop.is_set():
                g = Gen(i, f"s{i}-g{next(self._ids)}", time.monotonic())
                self.gens.append(g)
                await c.send(m.Generate(g.id, self.model, "x", _options(LONG)))
                async with asyncio.timeout(60):
                    while True:
                        msg = await c.recv()
                        if isinstance(msg, m.Delta) and msg.id == g.id:
                            if g.deltas == 0:
                                g.first_delta = time.monotonic()
                                suffix = f":{g.id}"
                                g.worker = next(
                                    (p for r, p in placements().items() if r.endswith(suffix)), 0
                                )
                            g.deltas += 1
                        elif isinstance(msg, m.Error) and msg.id == g.id:
                            g.error = msg
                        elif isinstance(msg, m.Done) and msg.id == g.id:
                            g.finish = msg.finish_reason
                            g.tokens = msg.usage.completion_tokens
                            g.ended = time.monotonic()
                            break
                        if self.stop.is_set():
                            return  # closing the connection cancels what is in flight

    def in_flight(self) -> list[Gen]:
        return [g for g in self.gens if g.finish is None]

    def streaming(self) -> bool:
        """Every session has a generation producing tokens on a known worker."""
        live = [g for g in self.in_flight() if g.deltas > 0 and g.worker]
        return len({g.session for g in live}) == SESSIONS

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ConnectionClosed):
                raise r


def _two_worker_config(tmp_path: Path, slow_model: Path) -> ServerConfig:
    config = server_config(tmp_path, {"slow": slow_model}, limits=LimitsConfig())
    return msgspec.structs.replace(config, workers=2)


async def _start_load(running: RunningServer) -> Load:
    token = running.gateway.auth.issue_token(sub="load", ttl=600)
    load = Load(running, token)
    load.start()
    await _until("every session to stream", load.streaming, 30)
    return load


def _check_outcomes(load: Load, victim: int, on_victim: list[Gen], why: str) -> None:
    """The victim's generations ended with engine_error, all others normally."""
    for g in on_victim:
        assert g.finish == "error", g
        assert g.error is not None and g.error.code == ErrorCode.ENGINE_ERROR, g
        assert g.error.retryable and why in g.error.message, g.error
    victims = {id(g) for g in on_victim}
    for g in load.gens:
        if id(g) in victims or g.finish is None:
            continue
        assert g.error is None and g.finish == "length", g  # nothing else failed
        assert g.tokens == LONG, g  # ... nor stopped short
    assert not any(g.worker == victim for g in load.gens if id(g) not in victims)


@dataclass
class _Hit:
    """A worker signalled while both workers stream: who was on it, and the pool's recovery."""

    pids: set[int]
    victim: int
    on_victim: list[Gen]
    others: list[Gen]
    t0: float
    restarted: asyncio.Task[float]


async def _signal_busy_worker(running: RunningServer, load: Load, sig: signal.Signals) -> _Hit:
    pids = {w.pid for w in (await running.gateway.engine.health()).workers}
    victim = min(pids)
    on_victim = [g for g in load.in_flight() if g.worker == victim]
    others = [g for g in load.in_flight() if g.worker != victim]
    assert on_victim and others  # both workers are busy
    os.kill(victim, sig)
    t0 = time.monotonic()
    restarted = asyncio.create_task(_restarted(running, pids, t0))
    return _Hit(pids, victim, on_victim, others, t0, restarted)


async def _recovery(hit: _Hit, load: Load, running: RunningServer) -> tuple[float, float, float]:
    """(pool whole, replacement's first token, its generation done), in seconds after the hit."""
    await _until("the others to finish", lambda: all(g.finish for g in hit.others), 60)
    first, done = await _replacement_serves(load, running, hit.pids, hit.t0)
    return await hit.restarted, first, done


async def _restarted(running: RunningServer, old: set[int], t0: float) -> float:
    """Seconds from ``t0`` until the pool is whole: a new worker, every model loaded in it."""
    engine = running.gateway.engine
    async with asyncio.timeout(60):
        while True:
            health = await engine.health()
            pids = {w.pid for w in health.workers}
            if health.ok and pids - old and all(w.models == ["slow"] for w in health.workers):
                return time.monotonic() - t0
            await asyncio.sleep(0.02)


async def _replacement_serves(
    load: Load, running: RunningServer, old: set[int], t0: float
) -> tuple[float, float]:
    """Wait until a generation on a new worker finished normally.

    Returns the seconds from ``t0`` to that generation's first token (the replacement
    serves) and to its end (a whole generation succeeded on it).
    """
    engine = running.gateway.engine

    def on_new() -> list[Gen]:
        return [g for g in load.gens if g.worker and g.worker not in old and g.finish == "length"]

    await _until("a generation on the replacement worker", lambda: bool(on_new()), 60)
    g = min(on_new(), key=lambda g: g.first_delta)
    health = await engine.health()
    assert health.ok and health.restarts == 1
    assert {w.pid for w in health.workers} - old == {g.worker}
    assert all(w.models == ["slow"] for w in health.workers)
    return g.first_delta - t0, g.ended - t0


# -- (a) SIGKILL a worker ------------------------------------------------------------------


async def test_sigkill_of_a_worker_under_load(tmp_path: Path, slow_model: Path) -> None:
    """Two workers, four sessions streaming; one worker is SIGKILLed.

    Exactly the generations it was serving end with a retryable ``engine_error`` (an
    error, then a done with reason ``error``) within a second; every generation on the
    other worker runs to its full length; a replacement starts, reloads the model and
    serves the sessions' next generations.
    """
    with _no_leaks():
        async with gateway(_two_worker_config(tmp_path, slow_model)) as running:
            load = await _start_load(running)
            try:
                hit = await _signal_busy_worker(running, load, signal.SIGKILL)
                victim, on_victim = hit.victim, hit.on_victim
                await _until(
                    "the victim's generations to end", lambda: all(g.finish for g in on_victim), 10
                )
                detected = max(g.ended for g in on_victim) - hit.t0
                pool_whole, *whole = await _recovery(hit, load, running)
            finally:
                await load.close()
            _check_outcomes(load, victim, on_victim, "died")
            assert detected < 10.0  # the dead socket, not the 120 s watchdog
            assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
            _report("sigkill worker: in-flight generations ended after", detected)
            _report("sigkill worker: replacement up with the model loaded after", pool_whole)
            _report("sigkill worker: replacement streamed its first token after", whole[0])
            _report("sigkill worker: a generation on the replacement completed after", whole[1])
        assert not psutil.pid_exists(victim)


# -- (b) SIGSTOP a worker for longer than the health timeout ----------------------------------

HEALTH_INTERVAL = 0.2
HEALTH_TIMEOUT = 1.5


async def test_sigstop_of_a_worker_under_load(tmp_path: Path, slow_model: Path) -> None:
    """As the SIGKILL case, but the worker is stopped: its socket stays open, no EOF.

    The watchdog (health pings, ``health_timeout``) must notice within about the
    timeout, end the stopped worker's generations with ``engine_error`` ("stopped
    responding"), kill it (a stopped process is not left behind) and replace it.
    """
    victim = 0
    try:
        with _no_leaks():
            config = msgspec.structs.replace(
                _two_worker_config(tmp_path, slow_model),
                health_interval=HEALTH_INTERVAL,
                health_timeout=HEALTH_TIMEOUT,
            )
            async with gateway(config) as running:
                load = await _start_load(running)
                try:
                    hit = await _signal_busy_worker(running, load, signal.SIGSTOP)
                    victim, on_victim = hit.victim, hit.on_victim
                    await _until(
                        "the stopped worker's generations to end",
                        lambda: all(g.finish for g in on_victim),
                        HEALTH_TIMEOUT + 10,
                    )
                    detected = max(g.ended for g in on_victim) - hit.t0
                    pool_whole, *whole = await _recovery(hit, load, running)
                finally:
                    await load.close()
                _check_outcomes(load, victim, on_victim, "stopped responding")
                # Not before the timeout (one ping interval of slack), not much after it.
                assert HEALTH_TIMEOUT - HEALTH_INTERVAL <= detected < HEALTH_TIMEOUT + 3
                _report(
                    f"sigstop worker (health_timeout {HEALTH_TIMEOUT} s): detected after", detected
                )
                _report("sigstop worker: replacement up with the model loaded after", pool_whole)
                _report("sigstop worker: replacement streamed its first token after", whole[0])
                _report("sigstop worker: a generation on the replacement completed after", whole[1])
            assert not psutil.pid_exists(victim)  # killed and reaped, not left stopped
    finally:
        if victim and psutil.pid_exists(victim):  # the test failed: do not leave it stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)


async def test_watchdog_spares_a_loading_worker_and_replaces_a_stopped_one(
    script_model: Path, slow_model: Path
) -> None:
    """A model load blocks a worker's loop on purpose: the watchdog must not count it.

    The worker is stopped before a load is sent and stays stopped for several health
    timeouts; the load just takes longer and the worker survives. Stopped again with
    nothing to load, it is replaced within the timeout.
    """
    config = EngineConfig(workers=1, threads_per_worker=1, health_interval=0.05, health_timeout=0.5)
    with _no_leaks():
        async with EngineClient(config) as client:
            await client.load("script", script_model)
            (worker,) = (await client.health()).workers
            os.kill(worker.pid, signal.SIGSTOP)
            try:
                loading = asyncio.create_task(client.load("slow", slow_model))
                await asyncio.sleep(4 * config.health_timeout)
                assert not loading.done()
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            async with asyncio.timeout(30):
                await loading
            health = await client.health()
            assert health.ok and health.restarts == 0 and health.workers[0].pid == worker.pid

            os.kill(worker.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            stream = client.generate(GenerateRequest(model="slow", prompt="x"))
            done = [ev async for ev in stream if isinstance(ev, GenerationDone)]
            detected = time.monotonic() - t0
            assert done[0].error is not None and done[0].error.code == ErrorCode.ENGINE_ERROR
            assert "stopped responding" in done[0].error.message
            assert config.health_timeout - config.health_interval <= detected < 5
            async with asyncio.timeout(30):
                # Whole again: a new worker with both models reloaded into it.
                while not (
                    (h := await client.health()).ok
                    and sorted(h.workers[0].models) == ["script", "slow"]
                ):
                    await asyncio.sleep(0.02)
            assert h.restarts == 1
            assert h.workers[0].pid != worker.pid
            _report("watchdog, idle stopped worker: generation ended after", detected)
        assert not psutil.pid_exists(worker.pid)


# -- `ferrous serve` as a subprocess ----------------------------------------------------------


def _serve(
    home: Path, model: Path, port: int, *, nofile: int | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``ferrous serve`` (no auth, one worker) on ``port``; ``nofile`` lowers RLIMIT_NOFILE."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            serve_command(port, f"slow={model}", auth=False),
            env={**os.environ, "FERROUS_HOME": str(home)},
            stdout=out,
            stderr=out,
            preexec_fn=limit,  # before exec: the limit is the server's alone
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


async def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError("the server did not start listening")


@contextlib.asynccontextmanager
async def _subprocess_server(
    tmp_path: Path, model: Path, **kw: object
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = _serve(tmp_path, model, port, **kw)  # type: ignore[arg-type]
    try:
        await _wait_listening(proc, port)
        yield proc, port
    finally:
        stop_process(proc)


# -- (d) kill and restart the gateway ----------------------------------------------------------


async def test_gateway_killed_and_restarted_sdk_reconnects(
    tmp_path: Path, slow_model: Path
) -> None:
    """`ferrous serve` is SIGKILLed under three SDK generations, then started again.

    Each in-flight generation raises :class:`ConnectionLost` (close code 1006, retryable)
    at once, no hang; the orphaned worker exits by itself; ``connect_with_retry``, begun
    while nothing listens, keeps trying and connects to the new server, which swept
    the rings the killed one left in /dev/shm; a new generation succeeds.
    """
    port = free_port()
    url = f"ws://127.0.0.1:{port}/v1/ws"
    procs: list[subprocess.Popen[bytes]] = []
    with _no_leaks():
        try:
            procs.append(_serve(tmp_path, slow_model, port))
            await _wait_listening(procs[0], port)
            first = procs[0].pid
            async with asyncio.timeout(60):
                client = await FerrousClient.connect_with_retry(url, attempts=3)
            gens = [
                client.generate("slow", "x", options={"max_tokens": 100_000, **GREEDY})
                for _ in range(3)
            ]
            outcomes: list[BaseException | None] = [None] * len(gens)
            received = [0] * len(gens)

            async def consume(i: int) -> None:
                try:
                    async for _ in gens[i]:
                        received[i] += 1
                except Exception as exc:  # what the SDK raised is checked below
                    outcomes[i] = exc

            consumers = [asyncio.create_task(consume(i)) for i in range(len(gens))]
            await _until("tokens on every generation", lambda: all(received), 30)
            workers = _worker_procs(first)
            assert len(workers) == 1 and _segments_of(first)

            procs[0].kill()
            t0 = time.monotonic()
            async with asyncio.timeout(10):  # a typed error, not a hang
                await asyncio.gather(*consumers)
            surfaced = time.monotonic() - t0
            for gen, exc in zip(gens, outcomes, strict=True):
                assert isinstance(exc, ConnectionLost), exc
                assert exc.generation_id == gen.id and exc.retryable
                assert exc.close_code == 1006  # abnormal closure: no close frame
            assert not client.connected
            await client.close()
            procs[0].wait(10)
            # The orphaned worker sees its control socket close and exits.
            await _until(
                "the orphaned worker to exit", lambda: not any(w.is_running() for w in workers), 10
            )

            # Reconnect while the server is still down: the helper retries until it is back.
            reconnect = asyncio.create_task(
                FerrousClient.connect_with_retry(
                    url, backoff=Backoff(attempts=60, initial=0.1, maximum=0.5)
                )
            )
            await asyncio.sleep(0.3)
            assert not reconnect.done()  # nothing listens yet
            procs.append(_serve(tmp_path, slow_model, port))
            async with asyncio.timeout(90):
                client = await reconnect
            reconnected = time.monotonic() - t0
            try:
                text = "".join(
                    [
                        d.text
                        async for d in client.generate(
                            "slow", "x", options={"max_tokens": 13, **GREEDY}
                        )
                    ]
                )
                whole = time.monotonic() - t0
                assert text == "Hi ö你🙂!"
            finally:
                await client.close()
            # The new server swept the rings the killed one left behind.
            assert _segments_of(first) == set()
            _report("gateway SIGKILL: in-flight generations raised ConnectionLost after", surfaced)
            _report("gateway SIGKILL: connect_with_retry reconnected after", reconnected)
            _report("gateway SIGKILL: service whole (new generation succeeded) after", whole)
        finally:
            for proc in procs:
                stop_process(proc)
        for proc in procs:
            assert _segments_of(proc.pid) == set()


# -- (c) out of file descriptors ---------------------------------------------------------------

NOFILE = 96


async def _open_session(url: str) -> tuple[ClientConnection, m.ServerMessage]:
    ws = await connect(url, subprotocols=[Subprotocol(m.SUBPROTOCOL_JSON)], open_timeout=3)
    await ws.send(JSON.encode(m.Hello()))
    async with asyncio.timeout(3):
        return ws, JSON.decode_server(await ws.recv())


async def test_open_file_limit_refuses_cleanly_and_recovers(
    tmp_path: Path, slow_model: Path
) -> None:
    """`ferrous serve` with RLIMIT_NOFILE = NOFILE: sessions are opened until it runs out.

    At the limit, a new connection is dropped at once (libuv accepts it into a spare
    descriptor it keeps for this and closes it: the client sees the connection close
    before any HTTP response, not a hang), and a generation asked for on a session
    already open is refused with a typed, retryable ``overloaded`` (its ring cannot be
    created). Nothing crashes: the open sessions stay open, no 1011. Closing them
    restores the service.
    """
    log = tmp_path / "server.log"
    with _no_leaks():
        async with _subprocess_server(tmp_path, slow_model, nofile=NOFILE, log=log) as (proc, port):
            url = f"ws://127.0.0.1:{port}/v1/ws"
            server = psutil.Process(proc.pid)
            base = server.num_fds()
            sessions: list[ClientConnection] = []
            refusals: list[BaseException | m.ServerMessage] = []
            try:
                async with asyncio.timeout(60):
                    for _ in range(NOFILE):  # more than the server can hold
                        try:
                            ws, first = await _open_session(url)
                        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                            refusals.append(exc)
                            if len(refusals) >= 3:
                                break
                            continue
                        if isinstance(first, m.Ready):
                            sessions.append(ws)
                        else:
                            refusals.append(first)
                            await ws.close()
                at_limit = server.num_fds()
                print(
                    f"\nfd limit {NOFILE}: {len(sessions)} sessions held, {base} fds at rest, "
                    f"{at_limit} at the limit; refusals: {[repr(r)[:120] for r in refusals]}"
                )
                assert refusals, "the server never ran out of descriptors"
                assert proc.poll() is None, "the server died at the fd limit"
                for r in refusals:  # dropped at once, not left to time out
                    assert isinstance(r, InvalidMessage | ConnectionClosed | OSError), r
                    assert not isinstance(r, TimeoutError), r
                # A generation on a session that is already open gets a typed, retryable
                # refusal (no ring can be created without a descriptor), never a 1011.
                ws = sessions[-1]
                await ws.send(JSON.encode(m.Generate("g", "slow", "x", _options(13))))
                async with asyncio.timeout(10):
                    while not isinstance(msg := JSON.decode_server(await ws.recv()), m.Error):
                        assert isinstance(msg, m.Started), msg
                assert msg.code == ErrorCode.OVERLOADED and msg.retryable and msg.id == "g", msg
                await asyncio.sleep(0.2)
                assert [ws.close_code for ws in sessions if ws.close_code is not None] == []
            finally:
                t0 = time.monotonic()
                for ws in sessions:
                    await ws.close()
            # Recovery: with the sessions gone, a new session generates normally.
            deadline = time.monotonic() + 30
            while True:
                try:
                    ws, first = await _open_session(url)
                    break
                except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed):
                    assert time.monotonic() < deadline, "no recovery after the sessions closed"
                    await asyncio.sleep(0.1)
            assert isinstance(first, m.Ready)
            await ws.send(JSON.encode(m.Generate("g", "slow", "x", _options(13))))
            async with asyncio.timeout(10):
                while not isinstance(msg := JSON.decode_server(await ws.recv()), m.Done):
                    assert not isinstance(msg, m.Error), msg
            assert msg.finish_reason == "length"
            await ws.close()
            _report("fd limit: service whole after the sessions closed", time.monotonic() - t0)
            assert proc.poll() is None
        assert _segments_of(proc.pid) == set()
        server_log = log.read_text()
        assert "Traceback" not in server_log and "session failed" not in server_log, server_log
