"""The worker processes behind the engine client: start, watch, replace, talk to.

Each worker is a spawned ``python -m engine.worker`` with one end of a Unix
socket pair; the event loop reads its control frames in
:meth:`Worker.data_received` (no thread per request, no polling). Frames
about generations (Wake, Finished) go straight to the generation's
:class:`Gen`; replies go to the future of the request that asked.

A worker that dies (crash, SIGKILL, OOM) reaches EOF: everything it was
running ends with ``engine_error`` at once, and a replacement is started
(the client reloads its models into it). A worker that hangs instead
(SIGSTOP, a deadlock in a backend) keeps its socket open, so a watchdog pings
every worker each ``health_interval`` seconds; one that leaves a ping
unanswered for ``health_timeout`` seconds (model loads excepted: they block
a worker's loop on purpose) is treated as dead the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec

from engine import ipc
from engine.interrupt import Interrupt
from engine.netring import NetRing
from engine.preemption import Runner
from engine.remote import RemoteProcess, WorkerHost, WorkerListener
from engine.requests import FinishReason
from engine.rings import Ring
from protocol.errors import EngineError, ErrorCode, FerrousError

__all__ = ["WAKE_SAFETY_S", "Gen", "Worker", "WorkerPool"]

log = logging.getLogger("ferrous.engine")

# Sleeping readers of non-empty rings are re-checked this often even without a
# Wake: a lost wake-up costs latency, never a hang.
WAKE_SAFETY_S = 1.0


class Gen:
    """Gateway-side state of one generation."""

    __slots__ = ("finished", "gen", "request_id", "ring", "waiter", "worker")

    def __init__(self, gen: int, request_id: str, ring: Ring | NetRing, worker: Worker) -> None:
        self.gen = gen
        self.request_id = request_id
        self.ring = ring
        self.worker = worker
        self.waiter: asyncio.Future[None] | None = None
        self.finished: ipc.Finished | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Worker(asyncio.Protocol):
    """One worker process and its control connection (an asyncio protocol).

    Frames are parsed in ``data_received``, straight from the event loop's
    read callback: a Wake costs one callback here and one task step in the
    waiting generation, nothing else.
    """

    def __init__(self, index: int, pool: WorkerPool) -> None:
        self.index = index
        self.pool = pool
        self.proc: asyncio.subprocess.Process | RemoteProcess | None = None
        self.transport: asyncio.WriteTransport | None = None
        self.frames = ipc.FrameBuffer()
        self.hello: asyncio.Future[ipc.Hello] = asyncio.get_running_loop().create_future()
        self.pid = 0
        self.alive = False
        self.models: dict[str, float] = {}
        self.gens: dict[int, Gen] = {}
        self.load: dict[str, int] = {}  # sequence slots reserved per model (engine admission)
        self.runners: dict[str, dict[int, Runner]] = {}  # per model: admitted requests
        self.replies: dict[int, asyncio.Future[ipc.FromWorker]] = {}
        # Jobs that answer with several frames (engine.jobs): every frame of one goes here.
        self.streams: dict[int, asyncio.Queue[ipc.FromWorker | EngineError]] = {}
        # Watchdog state (monotonic times): the unanswered ping, if any, and loads
        # in progress, during which the worker's loop is blocked on purpose.
        self.ping_req = 0
        self.ping_sent: float | None = None
        # Raised to cut the worker's current step short (engine.interrupt).
        self.interrupt: Interrupt | None = None
        # A worker on another machine (engine.remote): its text comes over the connection.
        self.remote = False
        self.where = "local"
        self.loading = 0
        self.load_ended = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        try:
            msgs = [ipc.decode_from_worker(body) for body in self.frames.feed(data)]
        except (ValueError, msgspec.DecodeError) as exc:
            log.error("worker %d sent a malformed frame: %s", self.index, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for msg in msgs:
            self.pool.dispatch(self, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)

    def send(self, msg: ipc.ToWorker) -> None:
        t = self.transport
        if self.alive and t is not None and not t.is_closing():
            t.write(ipc.encode(msg))

    def close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.interrupt is not None:
            self.interrupt.close()
            self.interrupt = None


class WorkerPool:
    """The worker processes. ``on_failed(models, why)`` is called when a worker is lost
    (the models it held); ``on_replaced(worker)`` is awaited when its replacement is up."""

    def __init__(
        self,
        *,
        count: int,
        start_timeout: float,
        health_interval: float,
        health_timeout: float,
        on_failed: Callable[[list[str], str], None],
        on_replaced: Callable[[Worker], Awaitable[None]],
        host: WorkerHost | None = None,
        listen: str = "127.0.0.1",
        read_ahead: str = "idle",
    ) -> None:
        self.count = count
        self.read_ahead = read_ahead  # the workers' --read-ahead (engine.readahead)
        # Where workers start: child processes here, or elsewhere through ``host``.
        self.host = host
        self._listener = WorkerListener(listen) if host is not None else None
        self.start_timeout = start_timeout
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self._on_failed = on_failed
        self._on_replaced = on_replaced
        self.workers: list[Worker] = []
        self.restarts = 0
        self._closing = False
        self._req_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def listener_port(self) -> int | None:
        return self._listener.port if self._listener is not None else None

    def next_req(self) -> int:
        """A request number unique among this pool's control requests."""
        return next(self._req_ids)

    def _spawn_task(self, coro: Awaitable[None], name: str | None = None) -> None:
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Spawn the workers and wait for each one's handshake."""
        if self.count < 1:
            raise ValueError("an engine needs at least one worker")
        self.workers = [Worker(i, self) for i in range(self.count)]
        if self._listener is not None:
            await self._listener.start()
        try:
            await asyncio.gather(*(self.spawn(w) for w in self.workers))
        except BaseException:
            await self.close()
            raise
        self._spawn_task(self.sweep(), "engine-wake-sweep")
        if self.health_interval > 0:
            self._spawn_task(self.watch(), "engine-watchdog")

    async def spawn(self, w: Worker) -> None:
        if self.host is not None:
            await self._spawn_remote(w, self.host)
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        w.interrupt = Interrupt.create()
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engine.worker",
                "--fd",
                str(child.fileno()),
                "--interrupt-fd",
                str(w.interrupt.fd),
                "--read-ahead",
                self.read_ahead,
                pass_fds=(child.fileno(), w.interrupt.fd),
            )
        except BaseException:
            parent.close()
            w.interrupt.close()
            w.interrupt = None
            raise
        finally:
            child.close()
        await asyncio.get_running_loop().create_unix_connection(lambda: w, sock=parent)
        try:
            hello = await asyncio.wait_for(asyncio.shield(w.hello), self.start_timeout)
        except (TimeoutError, EngineError) as exc:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()
            w.close_transport()
            why = "no handshake in time" if isinstance(exc, TimeoutError) else str(exc)
            raise EngineError(f"worker {w.index} did not start: {why}") from None
        w.pid = hello.pid
        w.alive = True
        log.info(
            "worker %d started (pid %d, backends %s)", w.index, w.pid, ",".join(hello.backends)
        )

    async def _spawn_remote(self, w: Worker, host: WorkerHost) -> None:
        """Start ``w`` through ``host``; it connects back to the listener with its nonce."""
        assert self._listener is not None
        w.remote = True
        nonce = self._listener.expect(w)
        address = f"{host.advertise}:{self._listener.port}"
        try:
            w.proc = await asyncio.wait_for(
                host.launch(w.index, address, nonce), self.start_timeout
            )
            hello = await asyncio.wait_for(asyncio.shield(w.hello), self.start_timeout)
        except (TimeoutError, EngineError) as exc:
            self._listener.forget(nonce)
            if w.proc is not None:
                w.proc.kill()
            w.close_transport()
            why = "no handshake in time" if isinstance(exc, TimeoutError) else str(exc)
            raise EngineError(f"worker {w.index} did not start: {why}") from None
        except BaseException:
            self._listener.forget(nonce)
            if w.proc is not None:
                w.proc.kill()
            raise
        w.pid = hello.pid
        w.where = host.describe(w.proc)
        w.alive = True
        log.info(
            "worker %d started on %s (%s, pid %d, backends %s)",
            w.index,
            hello.host,
            w.where,
            w.pid,
            ",".join(hello.backends),
        )

    async def close(self) -> None:
        """Stop every worker: ask politely, then kill after a few seconds."""
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        for w in self.workers:
            w.send(ipc.Shutdown())
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 5.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
                    await w.proc.wait()
            self.fail(w, "the engine is shutting down")
            w.close_transport()
        self.workers = []
        if self._listener is not None:
            await self._listener.close()
        if self.host is not None:
            await self.host.close()

    def dispatch(self, w: Worker, msg: ipc.FromWorker) -> None:
        if isinstance(msg, ipc.Text):
            g = w.gens.get(msg.gen)
            if g is not None and isinstance(g.ring, NetRing):
                g.ring.feed(msg.ids, msg.text, msg.extra)
                g.wake()
        elif isinstance(msg, ipc.Wake):
            g = w.gens.get(msg.gen)
            if g is not None:
                g.wake()
        elif isinstance(msg, ipc.Finished):
            g = w.gens.pop(msg.gen, None)
            if g is not None:
                g.finished = msg
                g.wake()
        elif isinstance(msg, ipc.Hello):
            if not w.hello.done():
                w.hello.set_result(msg)
        else:
            if msg.req == w.ping_req:
                w.ping_sent = None  # the watchdog's ping was answered
            queue = w.streams.get(msg.req)
            if queue is not None:
                queue.put_nowait(msg)
                return
            fut = w.replies.pop(msg.req, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def lost(self, w: Worker) -> None:
        if not w.hello.done():
            w.hello.set_exception(EngineError("the worker exited during start-up"))
        if not w.alive:
            return
        if not self._closing:
            log.error("worker %d (pid %d) exited", w.index, w.pid)
        self.fail(w, f"worker {w.index} (pid {w.pid}) died")
        if not self._closing:
            self._spawn_task(self.replace(w))

    async def sweep(self) -> None:
        """Safety net for wake-ups: re-check sleeping readers of non-empty rings once a second.

        Wake frames normally do this at once; the sweep bounds the cost of a
        lost wake-up flag to latency instead of a hang. Its cost does not grow
        with the token rate.
        """
        while True:
            await asyncio.sleep(WAKE_SAFETY_S)
            for w in self.workers:
                for g in list(w.gens.values()):
                    if g.waiter is not None and g.ring.used():
                        g.wake()

    async def watch(self) -> None:
        """Find workers that are alive but no longer answer, and replace them.

        A stopped or deadlocked worker keeps its socket open, so the EOF that
        reports a crash never comes and its generations would wait forever.
        Each worker gets one outstanding Ping at a time; the worker answers it
        between decode steps, so an answer later than ``health_timeout`` means
        the loop is stuck. Time spent loading a model does not count: a ping
        queued behind a load is measured from the end of the load.
        """
        interval = self.health_interval
        timeout = self.health_timeout
        while True:
            await asyncio.sleep(min(interval, timeout / 2))
            now = time.monotonic()
            for w in list(self.workers):
                if not w.alive or w.loading:
                    continue
                if w.ping_sent is None:
                    w.ping_req = self.next_req()
                    w.ping_sent = now
                    w.send(ipc.Ping(req=w.ping_req))
                elif now - max(w.ping_sent, w.load_ended) > timeout:
                    self.hung(w, now - w.ping_sent)

    def hung(self, w: Worker, silent: float) -> None:
        """Treat a worker that stopped answering as dead: fail its work, kill and replace it."""
        if not w.alive or self._closing:
            return
        log.error(
            "worker %d (pid %d) has not answered a health check for %.1f s: replacing it",
            w.index,
            w.pid,
            silent,
        )
        self.fail(
            w,
            f"worker {w.index} (pid {w.pid}) stopped responding "
            f"(no answer to a health check within {self.health_timeout:g} s)",
        )
        self._spawn_task(self.replace(w))  # kills the process first

    def fail(self, w: Worker, why: str) -> None:
        """End everything that was in flight on ``w`` with engine_error."""
        w.alive = False
        held = list(w.models)
        w.models.clear()
        self._on_failed(held, why)
        for g in w.gens.values():
            g.finished = ipc.Finished.ended(
                g.gen, FinishReason.ERROR.value, ErrorCode.ENGINE_ERROR.value, why
            )
            g.wake()
        w.gens.clear()
        for fut in w.replies.values():
            if not fut.done():
                fut.set_exception(EngineError(why, retryable=True))
        w.replies.clear()
        for queue in w.streams.values():
            queue.put_nowait(EngineError(why, retryable=True))
        w.streams.clear()

    async def replace(self, old: Worker) -> None:
        if old.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                old.proc.kill()
            await old.proc.wait()
        old.close_transport()
        new = Worker(old.index, self)
        try:
            await self.spawn(new)
        except FerrousError as exc:
            log.error("replacement of worker %d failed: %s", old.index, exc)
            return
        self.restarts += 1
        self.workers[old.index] = new
        await self._on_replaced(new)

    async def request(
        self, w: Worker, msg: ipc.ToWorker, req: int, timeout: float
    ) -> ipc.FromWorker:
        fut: asyncio.Future[ipc.FromWorker] = asyncio.get_running_loop().create_future()
        w.replies[req] = fut
        w.send(msg)
        try:
            async with asyncio.timeout(timeout):  # (not wait_for: see stream)
                return await fut
        except TimeoutError:
            raise EngineError(f"worker {w.index} did not answer within {timeout:.0f} s") from None
        finally:
            w.replies.pop(req, None)

    async def stream(
        self,
        w: Worker,
        msg: ipc.ToWorker,
        req: int,
        *,
        last: tuple[type[msgspec.Struct], ...],
        idle_timeout: float,
    ) -> AsyncIterator[ipc.FromWorker]:
        """Every frame the worker sends for job ``req``, as they come, to its last.

        The job's last frame is one of the ``last`` types, or a WorkerError.
        A caller that stops before it (its client went away) cancels the job in
        the worker. A worker that dies raises EngineError (retryable); one silent
        for ``idle_timeout`` seconds too.
        """
        queue: asyncio.Queue[ipc.FromWorker | EngineError] = asyncio.Queue()
        w.streams[req] = queue
        w.send(msg)
        done = False
        try:
            while True:
                try:
                    # Not wait_for: on Python 3.11 it returns the item, and loses the
                    # cancel, when the item and a cancel of this task arrive together.
                    async with asyncio.timeout(idle_timeout):
                        item = await queue.get()
                except TimeoutError:
                    raise EngineError(
                        f"worker {w.index} sent nothing for {idle_timeout:.0f} s"
                    ) from None
                if isinstance(item, EngineError):
                    done = True
                    raise item
                if isinstance(item, (ipc.WorkerError, *last)):
                    done = True
                yield item
                if done:
                    return
        finally:
            w.streams.pop(req, None)
            if not done:
                w.send(ipc.CancelJob(req=req))
