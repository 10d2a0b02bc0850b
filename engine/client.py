"""The gateway's handle on the engine: a pool of worker processes behind one asyncio API.

    async with EngineClient(EngineConfig(workers=2)) as engine:
        await engine.load("tiny", "/models/tiny.gguf")
        async for event in engine.generate(GenerateRequest(model="tiny", prompt="Hi")):
            ...  # TokenDelta ..., then one GenerationDone

Each worker is a spawned process with one end of a Unix socket pair; the
event loop reads its control frames (no thread per request, no polling).
Each generation gets a shared-memory ring that the worker writes and
:meth:`EngineClient.generate` reads; the worker sends a Wake frame only when
the reader is asleep on an empty ring.

Flow control is pull-based: the iterator reads the ring only when its consumer
asks for the next event. A consumer that stops reading fills the ring and the
worker pauses that generation (see :mod:`engine.worker`). Memory held for one
generation is therefore bounded by the ring capacity (``ring_capacity``,
default 64 KiB) plus one step's output in the worker and one record being
decoded here.

A worker that dies (crash, SIGKILL, OOM) ends every generation it served with
an ``engine_error`` event at once (its socket reaches EOF); the pool starts a
replacement and loads the same models into it.

A worker that hangs instead (SIGSTOP, a deadlock in a backend, a machine
swapping) keeps its socket open, so EOF never comes: a watchdog pings every
worker each ``health_interval`` seconds, and one that leaves a ping
unanswered for ``health_timeout`` seconds is treated as dead the same way
(its generations end with ``engine_error``, it is killed and replaced).
Model loads block a worker's loop legitimately, so they are exempt
(``load_timeout`` bounds them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from array import array
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import msgspec

from engine import ipc, preemption
from engine.backends.base import OnnxOptions
from engine.backends.select import check_model_file, check_onnx_folder, choose_backend
from engine.fairqueue import FairQueue, Waiting
from engine.memory import (
    default_budget,
    estimate_model_bytes,
    estimate_onnx_bytes,
    sequences_for,
)
from engine.preemption import Runner
from engine.requests import (
    Embeddings,
    ErrorInfo,
    FinishReason,
    GenerateRequest,
    GenerationDone,
    Timings,
    TokenDelta,
    Usage,
)
from engine.rings import DEFAULT_CAPACITY, Ring, sweep_orphans
from protocol.errors import (
    BadRequest,
    EngineError,
    ErrorCode,
    FerrousError,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    TooLarge,
    error_from_code,
)

__all__ = [
    "EngineClient",
    "EngineConfig",
    "EngineHealth",
    "LoadedModel",
    "ModelInfo",
    "StartCallback",
    "WaitCallback",
    "WorkerHealth",
    "default_threads",
    "default_workers",
]

log = logging.getLogger("ferrous.engine")

_REQUEST_ERRORS = frozenset(
    {ErrorCode.BAD_REQUEST.value, ErrorCode.MODEL_NOT_FOUND.value, ErrorCode.TOO_LARGE.value}
)
# A waiting request's place is re-read this often (and sent when it changed).
QUEUE_REPORT_S = 0.25
# How much each measured gap between starts counts in a model's running estimate.
_GAP_WEIGHT = 0.2

# Awaited with (requests ahead, estimated seconds or None) while a request waits.
WaitCallback = Callable[[int, float | None], Awaitable[None]]
StartCallback = Callable[[], Awaitable[None]]

# Sleeping readers of non-empty rings are re-checked this often even without a
# Wake: a lost wake-up costs latency, never a hang.
WAKE_SAFETY_S = 1.0
# An embedding call is answered in one frame after all its inputs are read; a
# large batch of long inputs on a small CPU can take minutes.
EMBED_TIMEOUT_S = 600.0


# Measured on 2 cores with SmolLM2 (bench.scheduler): aggregate tokens/s keeps
# growing to ~8 sequences per thread and flattens beyond.
SEQS_PER_THREAD = 8
# The ONNX decoder's batch scaling stops at ~4 rows (onnxruntime's int8 kernels,
# bench.onnx_ceiling); more rows only add f32 cache memory.
ONNX_SEQS = 4


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Threads per worker: all cores up to 4 (decode stops scaling beyond that on small models)."""
    return max(1, min(4, _cpus()))


def default_workers() -> int:
    """Workers so that workers x threads fits the cores."""
    return max(1, _cpus() // default_threads())


@dataclass
class EngineConfig:
    workers: int = field(default_factory=default_workers)
    threads_per_worker: int = field(default_factory=default_threads)
    ring_capacity: int = DEFAULT_CAPACITY
    stall_timeout: float = 30.0  # seconds a consumer may leave a full ring unread
    # Seconds one request's prompt may take to render, tokenize and truncate in a
    # worker (others wait meanwhile); past it the request fails too_large.
    prepare_timeout: float = 2.0
    # Requests that may wait for a sequence slot of one model; more are refused
    # (overloaded). Waiting ones start by priority, then in turns between tenants.
    max_queued: int = 256
    start_timeout: float = 60.0  # worker start-up handshake
    load_timeout: float = 600.0
    n_batch: int = 512
    # Sequences one worker decodes together per model; 0 = chosen per model: for
    # GGUF as many context windows as half the memory budget holds, up to
    # SEQS_PER_THREAD per thread; ONNX_SEQS for ONNX; 1 for one-at-a-time backends.
    seqs_per_worker: int = 0
    # Prompt tokens a step may read while other sequences decode (engine.stepplan):
    # the longest a running stream waits for a newcomer's prompt.
    prefill_chunk: int = 64
    kv_unified: bool = False  # GGUF sequences share one cache (see LoadParams)
    memory_budget: int = 0  # bytes loaded models may take; 0 = 80 % of available memory
    keep_alive: float = 300.0  # seconds an idle model stays loaded; < 0 = forever, 0 = unload
    # The watchdog: a worker that leaves a ping unanswered for health_timeout
    # seconds (model loads excepted) is killed and replaced. A worker answers
    # between decode steps, so the timeout must exceed the longest single step:
    # one n_batch prompt chunk of a large model on a small CPU can take tens of
    # seconds, hence the generous default. health_interval <= 0 turns it off.
    health_interval: float = 2.0  # seconds between watchdog pings of each worker
    health_timeout: float = 120.0
    onnx: OnnxOptions = field(default_factory=OnnxOptions)  # session options of ONNX models


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    backend: str
    n_ctx: int
    load_ms: float
    size: int = 0  # estimated bytes (see engine.memory)


class LoadedModel(msgspec.Struct, frozen=True):
    """A model in memory, as ``ferrous ps`` shows it."""

    name: str
    path: str
    backend: str
    n_ctx: int
    size: int  # estimated bytes, weights counted once
    active: int  # running generations
    loaded_at: float  # Unix time
    expires_at: float | None  # Unix time it will be unloaded when idle; None = kept


class WorkerHealth(msgspec.Struct, frozen=True):
    index: int
    pid: int
    alive: bool
    models: list[str]
    active: int
    queued: int
    rss_bytes: int
    tokens_generated: int


class EngineHealth(msgspec.Struct, frozen=True):
    ok: bool
    workers: list[WorkerHealth]
    restarts: int


@dataclass
class _ModelSpec:
    name: str
    path: str
    backend: str
    n_ctx: int
    chat_template: str | None = None
    size: int = 0
    n_seq: int = 1  # sequences each worker runs at once
    loaded_n_ctx: int = 0
    active: int = 0
    last_used: float = 0.0  # monotonic
    loaded_at: float = 0.0  # Unix time
    expires: float | None = None  # monotonic deadline when idle; None = never
    unloading: bool = False

    def touch(self, keep_alive: float) -> None:
        now = time.monotonic()
        self.last_used = now
        self.expires = None if keep_alive < 0 else now + keep_alive


class _Stranded(Exception):
    """A waiting request ends before it starts: its model lost its last worker, or it
    was cancelled."""

    def __init__(self, why: str, reason: FinishReason = FinishReason.ERROR) -> None:
        super().__init__(why)
        self.reason = reason


class _Ticket:
    """A waiting request's place in a fair queue: the future its caller awaits."""

    __slots__ = ("fut", "runner")

    def __init__(self, fut: asyncio.Future[_Worker], runner: Runner) -> None:
        self.fut = fut
        self.runner = runner


class _Gen:
    """Gateway-side state of one generation."""

    __slots__ = ("finished", "gen", "request_id", "ring", "waiter", "worker")

    def __init__(self, gen: int, request_id: str, ring: Ring, worker: _Worker) -> None:
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


class _Worker(asyncio.Protocol):
    """One worker process and its control connection (an asyncio protocol).

    Frames are parsed in ``data_received``, straight from the event loop's
    read callback: a Wake costs one callback here and one task step in the
    waiting generation, nothing else.
    """

    def __init__(self, index: int, client: EngineClient) -> None:
        self.index = index
        self.client = client
        self.proc: asyncio.subprocess.Process | None = None
        self.transport: asyncio.WriteTransport | None = None
        self.frames = ipc.FrameBuffer()
        self.hello: asyncio.Future[ipc.Hello] = asyncio.get_running_loop().create_future()
        self.pid = 0
        self.alive = False
        self.models: dict[str, float] = {}
        self.gens: dict[int, _Gen] = {}
        self.load: dict[str, int] = {}  # sequence slots reserved per model (engine admission)
        self.runners: dict[str, dict[int, Runner]] = {}  # per model: admitted requests
        self.replies: dict[int, asyncio.Future[ipc.FromWorker]] = {}
        # Watchdog state (monotonic times): the unanswered ping, if any, and loads
        # in progress, during which the worker's loop is blocked on purpose.
        self.ping_req = 0
        self.ping_sent: float | None = None
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
            self.client._dispatch(self, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._worker_lost(self)

    def send(self, msg: ipc.ToWorker) -> None:
        t = self.transport
        if self.alive and t is not None and not t.is_closing():
            t.write(ipc.encode(msg))

    def close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()


class EngineClient:
    """Asyncio client of the worker pool. Use as an async context manager."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._workers: list[_Worker] = []
        self._models: dict[str, _ModelSpec] = {}
        self._by_request: dict[str, _Gen] = {}
        self._queues: dict[str, FairQueue[_Ticket]] = {}
        self._waiting: dict[str, tuple[str, Waiting[_Ticket]]] = {}
        self._orders = itertools.count(1)  # admission order: the Runner key of each request
        # Per model: when a waiting request last started, and the running mean gap.
        self._last_start: dict[str, float] = {}
        self._start_gap: dict[str, float] = {}
        self._gen_ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._changed: asyncio.Condition | None = None
        self._closing = False
        self._restarts = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._load_lock: asyncio.Lock | None = None
        self.memory_budget = self.config.memory_budget or default_budget()

    # -- lifetime -------------------------------------------------------------------

    async def __aenter__(self) -> EngineClient:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Spawn the workers and wait for each one's handshake."""
        if self.config.workers < 1:
            raise ValueError("an engine needs at least one worker")
        self._changed = asyncio.Condition()
        self._load_lock = asyncio.Lock()
        removed = sweep_orphans()
        if removed:
            log.warning("removed %d shared-memory rings left by dead processes", len(removed))
        self._workers = [_Worker(i, self) for i in range(self.config.workers)]
        try:
            await asyncio.gather(*(self._spawn(w) for w in self._workers))
        except BaseException:
            await self.close()
            raise
        sweeper = asyncio.create_task(self._sweep(), name="engine-wake-sweep")
        self._tasks.add(sweeper)
        sweeper.add_done_callback(self._tasks.discard)
        if self.config.health_interval > 0:
            watchdog = asyncio.create_task(self._watch(), name="engine-watchdog")
            self._tasks.add(watchdog)
            watchdog.add_done_callback(self._tasks.discard)

    async def _spawn(self, w: _Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engine.worker",
                "--fd",
                str(child.fileno()),
                pass_fds=(child.fileno(),),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        await asyncio.get_running_loop().create_unix_connection(lambda: w, sock=parent)
        try:
            hello = await asyncio.wait_for(asyncio.shield(w.hello), self.config.start_timeout)
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

    async def close(self) -> None:
        """Stop every worker: ask politely, then kill after a few seconds."""
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        for w in self._workers:
            w.send(ipc.Shutdown())
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 5.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
                    await w.proc.wait()
            self._fail_worker(w, "the engine is shutting down")
            w.close_transport()
        self._workers = []

    # -- worker events --------------------------------------------------------------

    def _dispatch(self, w: _Worker, msg: ipc.FromWorker) -> None:
        if isinstance(msg, ipc.Wake):
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
            fut = w.replies.pop(msg.req, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _worker_lost(self, w: _Worker) -> None:
        if not w.hello.done():
            w.hello.set_exception(EngineError("the worker exited during start-up"))
        if not w.alive:
            return
        if not self._closing:
            log.error("worker %d (pid %d) exited", w.index, w.pid)
        self._fail_worker(w, f"worker {w.index} (pid {w.pid}) died")
        if not self._closing:
            task = asyncio.create_task(self._replace(w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        """Safety net for wake-ups: re-check sleeping readers of non-empty rings once a second.

        Wake frames normally do this at once; the sweep bounds the cost of a
        lost wake-up flag to latency instead of a hang. Its cost does not grow
        with the token rate.
        """
        while True:
            await asyncio.sleep(WAKE_SAFETY_S)
            for w in self._workers:
                for g in list(w.gens.values()):
                    if g.waiter is not None and g.ring.used():
                        g.wake()
            now = time.monotonic()
            for spec in list(self._models.values()):
                if spec.active == 0 and spec.expires is not None and now >= spec.expires:
                    self._unload_soon(spec, "its keep_alive expired")

    async def _watch(self) -> None:
        """Find workers that are alive but no longer answer, and replace them.

        A stopped or deadlocked worker keeps its socket open, so the EOF that
        reports a crash never comes and its generations would wait forever.
        Each worker gets one outstanding Ping at a time; the worker answers it
        between decode steps, so an answer later than ``health_timeout`` means
        the loop is stuck. Time spent loading a model does not count: a ping
        queued behind a load is measured from the end of the load.
        """
        interval = self.config.health_interval
        timeout = self.config.health_timeout
        while True:
            await asyncio.sleep(min(interval, timeout / 2))
            now = time.monotonic()
            for w in list(self._workers):
                if not w.alive or w.loading:
                    continue
                if w.ping_sent is None:
                    w.ping_req = next(self._req_ids)
                    w.ping_sent = now
                    w.send(ipc.Ping(w.ping_req))
                elif now - max(w.ping_sent, w.load_ended) > timeout:
                    self._hung(w, now - w.ping_sent)

    def _hung(self, w: _Worker, silent: float) -> None:
        """Treat a worker that stopped answering as dead: fail its work, kill and replace it."""
        if not w.alive or self._closing:
            return
        log.error(
            "worker %d (pid %d) has not answered a health check for %.1f s: replacing it",
            w.index,
            w.pid,
            silent,
        )
        self._fail_worker(
            w,
            f"worker {w.index} (pid {w.pid}) stopped responding "
            f"(no answer to a health check within {self.config.health_timeout:g} s)",
        )
        task = asyncio.create_task(self._replace(w))  # kills the process first
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unload_soon(self, spec: _ModelSpec, why: str) -> None:
        if spec.unloading or self._models.get(spec.name) is not spec:
            return
        spec.unloading = True
        log.info("unloading %s: %s", spec.name, why)
        task = asyncio.create_task(self._unload_spec(spec), name=f"unload {spec.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload_spec(self, spec: _ModelSpec) -> None:
        assert self._load_lock is not None
        async with self._load_lock:
            if self._models.get(spec.name) is not spec or spec.active:
                spec.unloading = False
                return
            del self._models[spec.name]
            await asyncio.gather(*(self._unload_on(w, spec.name) for w in self._workers if w.alive))

    def _fail_worker(self, w: _Worker, why: str) -> None:
        """End everything that was in flight on ``w`` with engine_error."""
        w.alive = False
        held = list(w.models)
        w.models.clear()
        self._strand(held, why)
        for g in w.gens.values():
            g.finished = ipc.Finished(
                g.gen,
                FinishReason.ERROR.value,
                0,
                0,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
                ErrorCode.ENGINE_ERROR.value,
                why,
            )
            g.wake()
        w.gens.clear()
        for fut in w.replies.values():
            if not fut.done():
                fut.set_exception(EngineError(why, retryable=True))
        w.replies.clear()

    async def _replace(self, old: _Worker) -> None:
        if old.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                old.proc.kill()
            await old.proc.wait()
        old.close_transport()
        new = _Worker(old.index, self)
        try:
            await self._spawn(new)
        except FerrousError as exc:
            log.error("replacement of worker %d failed: %s", old.index, exc)
            return
        self._restarts += 1
        self._workers[old.index] = new
        for spec in list(self._models.values()):
            try:
                await self._load_on(new, spec)
            except FerrousError as exc:
                log.error("reloading %s into worker %d failed: %s", spec.name, new.index, exc)
        await self._notify()

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
        for model in list(self._queues):  # a worker came or went: slots may have appeared
            self._grant(model)

    # -- admission: who starts when every slot is busy (engine.fairqueue) ------------

    def _slots(self, model: str) -> int:
        spec = self._models.get(model)
        return spec.n_seq if spec is not None else 1

    def _room(self, model: str, arrival: Runner | None = None) -> _Worker | None:
        """The worker a request of ``model`` starts on now, or None when it must wait.

        The least loaded live worker holding the model with a free sequence
        slot; else, for ``arrival``, a worker where it may pause a running
        sequence (engine.preemption: a lower priority class, or a tenant
        holding more than its share). Such a worker is handed one request more
        than its slots, at most twice its slots in all.
        """
        slots = self._slots(model)
        best: _Worker | None = None
        for w in self._workers:
            if not w.alive or model not in w.models:
                continue
            used = w.load.get(model, 0)
            if used < slots and (best is None or used < best.load.get(model, 0)):
                best = w
        if best is not None or arrival is None:
            return best
        for w in self._workers:
            if not w.alive or model not in w.models or w.load.get(model, 0) >= 2 * slots:
                continue
            if preemption.victim(list(w.runners.get(model, {}).values()), arrival) is not None:
                return w
        return None

    def _take(self, w: _Worker, model: str, runner: Runner) -> None:
        w.load[model] = w.load.get(model, 0) + 1
        w.runners.setdefault(model, {})[runner.key] = runner

    async def _admit(
        self, request: GenerateRequest, on_wait: WaitCallback | None = None
    ) -> tuple[_Worker, int]:
        """A worker with a slot reserved for ``request``: at once, or in fair-queue order.

        Dispatching only to a worker with room keeps the workers' own queues
        empty, so the order requests start in is decided here, by priority and
        then by turns between tenants, not by arrival alone.
        """
        model = request.model
        await self._pick(model)  # the model is loaded somewhere (waits for a replacement)
        queue = self._queues.setdefault(model, FairQueue(self.config.max_queued))
        order = next(self._orders)
        runner = Runner(order, request.tenant or "", request.priority, order)
        if not len(queue):
            w = self._room(model, runner)
            if w is not None:
                self._take(w, model, runner)
                return w, order
        granted: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        entry = queue.push(request.tenant or "", request.priority, _Ticket(granted, runner))
        self._waiting[request.request_id] = (model, entry)
        self._grant(model)
        try:
            if on_wait is None:
                return await granted, order
            told: int | None = None
            while not granted.done():
                try:
                    place = queue.position(entry)
                except ValueError:  # granted (or stranded) a moment ago
                    break
                if place != told:
                    told = place
                    await on_wait(place, self._estimate(model, place))
                await asyncio.wait((granted,), timeout=QUEUE_REPORT_S)
            return await granted, order
        except BaseException:
            if (
                not queue.remove(entry)
                and granted.done()
                and not granted.cancelled()
                and granted.exception() is None
            ):
                self._leave(granted.result(), model, runner.key)  # granted as the caller left
            raise
        finally:
            self._waiting.pop(request.request_id, None)

    def _grant(self, model: str) -> None:
        """Hand room on ``model``'s workers to waiting requests, in fair-queue order."""
        queue = self._queues.get(model)
        while queue is not None and len(queue):
            head = queue.peek()
            assert head is not None
            if head.handle.fut.done():
                queue.remove(head)  # its caller already left
                continue
            w = self._room(model)
            if w is not None:
                taken = queue.pop()  # the head: pop also passes the turn to the next tenant
                assert taken is head
            else:
                # No free slot: the first waiting request, in queue order, that may
                # pause a running one (a higher class, a tenant below its share).
                for head in queue.ordered():
                    if not head.handle.fut.done():
                        w = self._room(model, head.handle.runner)
                        if w is not None:
                            break
                if w is None:
                    return
                queue.remove(head)
            self._take(w, model, head.handle.runner)
            head.handle.fut.set_result(w)
            now = time.monotonic()
            last = self._last_start.get(model)
            self._last_start[model] = now
            if last is not None:
                gap = self._start_gap.get(model)
                self._start_gap[model] = (
                    now - last if gap is None else gap + _GAP_WEIGHT * (now - last - gap)
                )

    def _estimate(self, model: str, place: int) -> float | None:
        """Seconds until a request with ``place`` requests ahead starts, from recent starts."""
        gap = self._start_gap.get(model)
        return None if gap is None else round((place + 1) * gap, 2)

    def _strand(self, models: list[str], why: str) -> None:
        """Requests waiting for models that no live worker holds any more end, retryable.

        As before there was a queue here: a request waiting behind a worker
        that died ends with a retryable engine_error rather than waiting for
        a replacement that may never load the model.
        """
        for model in models:
            queue = self._queues.get(model)
            if queue is None or any(w.alive and model in w.models for w in self._workers):
                continue
            while (entry := queue.pop()) is not None:
                if not entry.handle.fut.done():
                    entry.handle.fut.set_exception(_Stranded(why))

    def _leave(self, w: _Worker, model: str, key: int) -> None:
        """A generation on ``w`` ended (or never started): its room goes to the next waiter."""
        w.load[model] = max(0, w.load.get(model, 0) - 1)
        w.runners.get(model, {}).pop(key, None)
        self._grant(model)

    def queued(self, model: str) -> int:
        """Requests waiting for a slot of ``model``."""
        queue = self._queues.get(model)
        return len(queue) if queue is not None else 0

    async def _request(
        self, w: _Worker, msg: ipc.ToWorker, req: int, timeout: float
    ) -> ipc.FromWorker:
        fut: asyncio.Future[ipc.FromWorker] = asyncio.get_running_loop().create_future()
        w.replies[req] = fut
        w.send(msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise EngineError(f"worker {w.index} did not answer within {timeout:.0f} s") from None
        finally:
            w.replies.pop(req, None)

    # -- models ---------------------------------------------------------------------

    async def load(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        backend: str = "",
        n_ctx: int = 0,
        chat_template: str | None = None,
        keep_alive: float | None = None,
    ) -> ModelInfo:
        """Load a model file into every worker under ``name`` (replacing one of that name).

        Idle models are unloaded, least recently used first, when the new one
        does not fit the memory budget; a model that cannot fit even then is
        refused with ``too_large`` (bigger than the whole budget) or
        ``overloaded`` (the room is held by models with running generations).
        """
        spec = _ModelSpec(name, os.path.abspath(os.fspath(path)), backend, n_ctx, chat_template)
        # Reject bad files here, with a typed error, before any worker sees them.
        kind = choose_backend(spec.path, backend or None)
        workers = max(1, len(self._workers))
        if kind == "onnx":
            check_onnx_folder(spec.path)
            spec.n_seq = self.config.seqs_per_worker or ONNX_SEQS
            spec.size = estimate_onnx_bytes(
                spec.path,
                n_ctx=n_ctx,
                workers=workers,
                n_seq=spec.n_seq,
                prefix_cache=max(0, self.config.onnx.prefix_cache_mb) * 2**20
                if self.config.onnx.prefix_reuse
                else 0,
            )
        else:
            header = check_model_file(spec.path, kind)
            if self.config.seqs_per_worker:
                spec.n_seq = self.config.seqs_per_worker
            elif kind == "llama_cpp" and self.config.kv_unified:
                spec.n_seq = SEQS_PER_THREAD * self.config.threads_per_worker
            elif kind == "llama_cpp":
                spec.n_seq = sequences_for(
                    header,
                    n_ctx=n_ctx,
                    workers=workers,
                    budget=self.memory_budget,
                    cap=SEQS_PER_THREAD * self.config.threads_per_worker,
                )
            spec.size = estimate_model_bytes(
                header,
                n_ctx=n_ctx,
                workers=workers,
                n_batch=self.config.n_batch,
                n_seq=spec.n_seq,
                unified=self.config.kv_unified,
            )
        assert self._load_lock is not None
        async with self._load_lock:
            await self._make_room(spec)
            results = await asyncio.gather(
                *(self._load_on(w, spec) for w in self._workers if w.alive),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors or not results:
                for w in self._workers:
                    if name in w.models and name not in self._models:
                        await self._unload_on(w, name)
                if errors:
                    raise errors[0]
                raise EngineError("no live worker to load the model into", retryable=True)
            loaded = [r for r in results if isinstance(r, ipc.ModelLoaded)]
            spec.loaded_n_ctx = loaded[0].n_ctx
            spec.loaded_at = time.time()
            spec.touch(self.config.keep_alive if keep_alive is None else keep_alive)
            self._models[name] = spec
        await self._notify()
        return ModelInfo(
            name,
            spec.path,
            backend or "auto",
            loaded[0].n_ctx,
            max(r.load_ms for r in loaded),
            spec.size,
        )

    async def _make_room(self, spec: _ModelSpec) -> None:
        """Unload idle models, least recently used first, until ``spec`` fits the budget."""
        budget = self.memory_budget
        mib = 1024 * 1024
        if spec.size > budget:
            raise TooLarge(
                f"model {spec.name!r} needs about {spec.size // mib} MiB but the engine's memory "
                f"budget is {budget // mib} MiB (set engine memory_budget, or a smaller num_ctx)"
            )
        others = [s for s in self._models.values() if s.name != spec.name]
        used = sum(s.size for s in others)
        for victim in sorted((s for s in others if s.active == 0), key=lambda s: s.last_used):
            if used + spec.size <= budget:
                break
            log.info("unloading %s (idle) to make room for %s", victim.name, spec.name)
            del self._models[victim.name]
            await asyncio.gather(
                *(self._unload_on(w, victim.name) for w in self._workers if w.alive)
            )
            used -= victim.size
        if used + spec.size > budget:
            busy = ", ".join(s.name for s in self._models.values() if s.name != spec.name)
            raise Overloaded(
                f"model {spec.name!r} needs about {spec.size // mib} MiB; the memory budget "
                f"({budget // mib} MiB) is held by models with running generations ({busy})"
            )

    async def _load_on(self, w: _Worker, spec: _ModelSpec) -> ipc.ModelLoaded:
        req = next(self._req_ids)
        msg = ipc.LoadModel(
            req,
            spec.name,
            spec.path,
            spec.backend,
            spec.n_ctx,
            self.config.threads_per_worker,
            self.config.n_batch,
            spec.n_seq,
            spec.chat_template,
            self.config.onnx,
            self.config.prefill_chunk,
            self.config.kv_unified,
        )
        w.loading += 1
        try:
            reply = await self._request(w, msg, req, self.config.load_timeout)
        except EngineError as exc:
            # A worker that dies while loading is usually a file that crashed the backend.
            raise ModelLoadError(
                spec.path, "backend", f"the worker died loading it ({exc.message})"
            ) from None
        finally:
            w.loading -= 1
            w.load_ended = time.monotonic()
        if isinstance(reply, ipc.WorkerError):
            if reply.path is not None:
                raise ModelLoadError(
                    reply.path, reply.reason or "backend", reply.detail or reply.message
                )
            raise error_from_code(reply.code, reply.message, retryable=reply.retryable)
        assert isinstance(reply, ipc.ModelLoaded)
        w.models[spec.name] = reply.load_ms
        return reply

    async def unload(self, name: str) -> None:
        """Unload a model from every worker; its running generations end as cancelled."""
        if self._models.pop(name, None) is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        await asyncio.gather(*(self._unload_on(w, name) for w in self._workers if w.alive))
        queue = self._queues.pop(name, None)
        while queue is not None and (entry := queue.pop()) is not None:
            if not entry.handle.fut.done():
                entry.handle.fut.set_exception(ModelNotFound(f"model {name!r} was unloaded"))
        await self._notify()

    def loaded(self) -> list[LoadedModel]:
        """The models in memory, most recently used first."""
        now_mono, now = time.monotonic(), time.time()
        return [
            LoadedModel(
                s.name,
                s.path,
                s.backend or "auto",
                s.loaded_n_ctx,
                s.size,
                s.active,
                s.loaded_at,
                None if s.expires is None or s.active else now + (s.expires - now_mono),
            )
            for s in sorted(self._models.values(), key=lambda s: -s.last_used)
        ]

    def set_keep_alive(self, name: str, keep_alive: float) -> None:
        """Change how long ``name`` stays loaded once idle (0 unloads it when idle)."""
        spec = self._models.get(name)
        if spec is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        spec.touch(keep_alive)
        if keep_alive == 0 and spec.active == 0:
            self._unload_soon(spec, "keep_alive is 0")

    async def _unload_on(self, w: _Worker, name: str) -> None:
        req = next(self._req_ids)
        with contextlib.suppress(EngineError):
            await self._request(w, ipc.UnloadModel(req, name), req, 60.0)
        w.models.pop(name, None)

    def models(self) -> list[str]:
        return sorted(self._models)

    async def health(self) -> EngineHealth:
        async def ping(w: _Worker) -> WorkerHealth:
            if w.alive:
                req = next(self._req_ids)
                try:
                    p = await self._request(w, ipc.Ping(req), req, 5.0)
                    assert isinstance(p, ipc.Pong)
                    return WorkerHealth(
                        w.index,
                        w.pid,
                        True,
                        p.models,
                        p.active,
                        p.queued,
                        p.rss_bytes,
                        p.tokens_generated,
                    )
                except EngineError:
                    pass
            return WorkerHealth(w.index, w.pid, False, [], 0, 0, 0, 0)

        workers = list(await asyncio.gather(*(ping(w) for w in self._workers)))
        return EngineHealth(
            bool(workers) and all(w.alive for w in workers), workers, self._restarts
        )

    # -- generation -----------------------------------------------------------------

    async def _pick(self, model: str) -> _Worker:
        """The least busy live worker with ``model``; waits for a replacement worker."""
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout
        while True:
            candidates = (
                [w for w in self._workers if w.alive and model in w.models]
                if model in self._models
                else []
            )
            if candidates:
                return min(candidates, key=lambda w: len(w.gens))
            if model not in self._models:
                raise ModelNotFound(f"model {model!r} is not loaded")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EngineError(f"no worker has model {model!r} ready", retryable=True)
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def generate(
        self,
        request: GenerateRequest,
        *,
        on_wait: WaitCallback | None = None,
        on_start: StartCallback | None = None,
    ) -> AsyncGenerator[TokenDelta | GenerationDone, None]:
        """Stream a generation: :class:`TokenDelta` events, then one :class:`GenerationDone`.

        Raises :class:`~protocol.errors.FerrousError` for a request that cannot
        start (unknown model, bad prompt). Closing the iterator early, or
        cancelling the task that iterates it, cancels the generation.

        When every sequence slot of the model is busy the request waits in the
        model's fair queue: ``on_wait(ahead, seconds)`` is awaited at once and
        whenever its place changes (``seconds`` estimates the wait from how
        fast waiting requests have been starting; None until known), and
        ``on_start()`` once it has a slot.
        """
        if request.request_id in self._by_request or request.request_id in self._waiting:
            raise FerrousError(f"request id {request.request_id!r} is already running")
        try:
            worker, key = await self._admit(request, on_wait)
        except _Stranded as exc:
            error = exc.reason is FinishReason.ERROR
            yield self._done(
                request.request_id,
                ipc.Finished(
                    0,
                    exc.reason.value,
                    0,
                    0,
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                    ErrorCode.ENGINE_ERROR.value if error else None,
                    str(exc) if error else None,
                ),
            )
            return
        if on_start is not None:
            try:
                await on_start()
            except BaseException:
                self._leave(worker, request.model, key)
                raise
        spec = self._models.get(request.model)
        if spec is None:  # unloaded while the request waited for a slot
            self._leave(worker, request.model, key)
            raise ModelNotFound(f"model {request.model!r} is not loaded")
        spec.active += 1
        spec.last_used = time.monotonic()
        try:
            ring = Ring.create(self.config.ring_capacity)
        except OSError as exc:
            # Out of file descriptors (EMFILE) or of /dev/shm (ENOSPC): the
            # server is out of a resource, not broken, and the caller may retry.
            self._release(spec, request.keep_alive)
            self._leave(worker, request.model, key)
            log.error("cannot create a ring for %s: %s", request.request_id, exc)
            raise Overloaded(
                f"the server cannot allocate a token ring now ({exc.strerror or exc})"
            ) from None
        except BaseException:
            self._release(spec, request.keep_alive)
            self._leave(worker, request.model, key)
            raise
        g = _Gen(next(self._gen_ids), request.request_id, ring, worker)
        worker.gens[g.gen] = g
        self._by_request[g.request_id] = g
        worker.send(
            ipc.Generate(
                g.gen,
                request.request_id,
                request.model,
                ring.name,
                request.prompt,
                request.messages,
                request.sampling,
                request.token_ids,
                self.config.stall_timeout,
                request.truncate,
                request.max_prompt_tokens,
                self.config.prepare_timeout,
                request.priority,
                request.tenant or "",
            )
        )
        want_ids = request.token_ids
        loop = asyncio.get_running_loop()
        seq = 0
        try:
            while True:
                finished = g.finished  # read before the ring: data precedes Finished
                records, resume = ring.read()
                if resume:
                    worker.send(ipc.Resume(g.gen))
                for ids, text in records:
                    yield TokenDelta(text.decode("utf-8"), seq, ids if want_ids else None)
                    seq += 1
                if finished is not None:
                    if records:
                        continue  # drain whatever is left before the final event
                    done = self._done(g.request_id, finished)
                    if done.error is not None and seq == 0 and done.error.code in _REQUEST_ERRORS:
                        raise error_from_code(done.error.code, done.error.message)
                    yield done
                    return
                waiter = loop.create_future()
                g.waiter = waiter
                # Finished may have arrived while a delta was being handed out.
                if g.finished is None and ring.arm_wait():
                    await waiter
                g.waiter = None
        finally:
            if g.finished is None:
                worker.gens.pop(g.gen, None)
                worker.send(ipc.Cancel(g.gen))
            self._by_request.pop(g.request_id, None)
            ring.close()
            self._release(spec, request.keep_alive)
            self._leave(worker, request.model, key)

    def _release(self, spec: _ModelSpec, keep_alive: float | None) -> None:
        spec.active -= 1
        spec.touch(self.config.keep_alive if keep_alive is None else keep_alive)
        if spec.active == 0 and spec.expires is not None and spec.expires <= spec.last_used:
            self._unload_soon(spec, "keep_alive is 0")

    @staticmethod
    def _done(request_id: str, f: ipc.Finished) -> GenerationDone:
        error = None
        if f.error_code is not None:
            error = ErrorInfo(
                f.error_code,
                f.error_message or "",
                retryable=f.error_code
                in (ErrorCode.ENGINE_ERROR.value, ErrorCode.OVERLOADED.value),
            )
        return GenerationDone(
            request_id,
            FinishReason(f.reason),
            Usage(f.prompt_tokens, f.completion_tokens, f.cached_tokens),
            Timings(f.load_ms, f.queue_ms, f.ttft_ms, f.total_ms, f.decode_tok_s),
            error,
        )

    # -- embeddings -----------------------------------------------------------------

    async def embed(
        self,
        model: str,
        inputs: list[str],
        *,
        truncate: bool = True,
        keep_alive: float | None = None,
    ) -> Embeddings:
        """Embedding vectors of ``inputs`` (unit length, in input order) from one worker.

        The least busy live worker that has ``model`` computes them between its
        decode steps. ``truncate=False`` refuses an input longer than the
        embedding context (BadRequest) instead of cutting it. ``keep_alive``
        means what it means for :class:`GenerateRequest`. Raises ModelNotFound,
        BadRequest (no inputs, an empty input, a backend without embeddings) or
        EngineError (the worker died; retryable).
        """
        if not inputs:
            raise BadRequest("no inputs to embed")
        req = next(self._req_ids)
        msg = ipc.Embed(req, model, list(inputs), truncate)
        # A frame the worker cannot read would end its connection: refuse it here.
        if sum(map(len, inputs)) * 4 + 16 * len(inputs) > ipc.MAX_FRAME:
            size = len(ipc.encode(msg))
            if size > ipc.MAX_FRAME:
                raise TooLarge(f"the inputs take {size} bytes; one request takes {ipc.MAX_FRAME}")
        worker = await self._pick(model)
        spec = self._models[model]
        spec.active += 1
        spec.last_used = time.monotonic()
        try:
            reply = await self._request(worker, msg, req, EMBED_TIMEOUT_S)
        finally:
            self._release(spec, keep_alive)
        if isinstance(reply, ipc.WorkerError):
            raise error_from_code(reply.code, reply.message, retryable=reply.retryable)
        assert isinstance(reply, ipc.Embedded)
        floats = array("f")
        floats.frombytes(reply.data)
        flat = floats.tolist()
        dim = reply.dim
        vectors = [flat[i : i + dim] for i in range(0, len(flat), dim)] if dim else []
        return Embeddings(vectors, reply.prompt_tokens, model)

    def placements(self) -> dict[str, int]:
        """Running request ids and the pid of the worker serving each.

        For diagnostics and fault tests: which generations a worker's crash or
        hang would end.
        """
        return {rid: g.worker.pid for rid, g in self._by_request.items()}

    async def cancel(self, request_id: str) -> bool:
        """Cancel a running generation; its iterator ends with reason ``cancelled``.

        Returns False when no such generation is running.
        """
        waiting = self._waiting.get(request_id)
        if waiting is not None:  # still waiting for a slot: it never starts
            model, entry = waiting
            queue = self._queues.get(model)
            if queue is not None and queue.remove(entry) and not entry.handle.fut.done():
                entry.handle.fut.set_exception(_Stranded("cancelled", FinishReason.CANCELLED))
                return True
        g = self._by_request.get(request_id)
        if g is None or g.finished is not None:
            return False
        g.worker.send(ipc.Cancel(g.gen))
        return True
