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

The parts, each in its own module: the worker processes, their watchdog and
replacements (:mod:`engine.pool`); which models are loaded, within the memory
budget and keep-alive (:mod:`engine.residency`); who gets a sequence slot and
when, fair queue and preemption included (:mod:`engine.admission`). This
class ties them together and carries the generations and embeddings; the
gateway uses only its public methods.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator
from types import TracebackType

import msgspec

from engine import ipc
from engine.admission import Admission, Stranded
from engine.interface import EngineHealth, StartCallback, WaitCallback, WorkerHealth
from engine.jobcalls import JobCalls
from engine.logprobs import TokenLogprob
from engine.netring import NetRing
from engine.placement import Affinity
from engine.pool import Gen, Worker, WorkerPool
from engine.requests import (
    ErrorInfo,
    FinishReason,
    GenerateRequest,
    GenerationDone,
    Timings,
    TokenDelta,
    Usage,
)
from engine.residency import LoadedModel, ModelInfo, ModelSpec, Residency
from engine.rings import Ring, sweep_orphans
from engine.settings import EngineConfig, default_threads, default_workers
from protocol.errors import (
    EngineError,
    ErrorCode,
    FerrousError,
    ModelNotFound,
    Overloaded,
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

_LOGPROBS = msgspec.msgpack.Decoder(list[TokenLogprob])  # a record's extra bytes
_REQUEST_ERRORS = frozenset(
    {ErrorCode.BAD_REQUEST.value, ErrorCode.MODEL_NOT_FOUND.value, ErrorCode.TOO_LARGE.value}
)


class EngineClient(JobCalls):
    """Asyncio client of the worker pool. Use as an async context manager."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._by_request: dict[str, Gen] = {}
        self._pool = WorkerPool(
            count=self.config.workers,
            start_timeout=self.config.start_timeout,
            health_interval=self.config.health_interval,
            health_timeout=self.config.health_timeout,
            on_failed=lambda models, why: self._admission.strand(models, why),
            on_replaced=self._reload,
            host=self.config.host,
            listen=self.config.worker_listen,
            read_ahead=self.config.read_ahead,
        )
        self._residency = Residency(self.config, self._pool, self._notify)
        self._affinity = Affinity()
        self._admission: Admission[Worker] = Admission(
            lambda: self._workers, self._residency.slots, self.config.max_queued
        )
        self._gen_ids = itertools.count(1)
        self._changed: asyncio.Condition | None = None
        self._closing = False

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
        removed = sweep_orphans()
        if removed:
            log.warning("removed %d shared-memory rings left by dead processes", len(removed))
        await self._pool.start()
        self._residency.start()

    @property
    def _workers(self) -> list[Worker]:
        return self._pool.workers

    async def close(self) -> None:
        """Stop every worker: ask politely, then kill after a few seconds."""
        self._closing = True
        self._residency.close()
        await self._pool.close()

    async def _reload(self, new: Worker) -> None:
        """A replacement worker is up: load every model into it, then wake waiters."""
        await self._residency.reload(new)
        await self._notify()

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()
        self._admission.grant_all()  # a worker came or went: slots may have appeared

    # -- admission: who starts when every slot is busy (engine.fairqueue) ------------

    def queued(self, model: str) -> int:
        """Requests waiting for a slot of ``model``."""
        return self._admission.queued(model)

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
        """Load a model file into every worker under ``name`` (see engine.residency)."""
        return await self._residency.load(
            name,
            path,
            backend=backend,
            n_ctx=n_ctx,
            chat_template=chat_template,
            keep_alive=keep_alive,
        )

    async def unload(self, name: str) -> None:
        """Unload a model from every worker; its running generations end as cancelled."""
        await self._residency.unload(name)
        self._admission.drop(name, ModelNotFound(f"model {name!r} was unloaded"))
        await self._notify()

    def loaded(self) -> list[LoadedModel]:
        """The models in memory, most recently used first."""
        return self._residency.loaded()

    def set_keep_alive(self, name: str, keep_alive: float) -> None:
        """Change how long ``name`` stays loaded once idle (0 unloads it when idle)."""
        self._residency.set_keep_alive(name, keep_alive)

    @property
    def memory_budget(self) -> int:
        """Bytes loaded models may take (engine.memory); settable."""
        return self._residency.memory_budget

    @memory_budget.setter
    def memory_budget(self, value: int) -> None:
        self._residency.memory_budget = value

    @property
    def _models(self) -> dict[str, ModelSpec]:
        return self._residency.models

    def models(self) -> list[str]:
        return sorted(self._models)

    def worker_pids(self) -> dict[int, int]:
        """Live local workers' process ids by worker index (for per-process metrics; a
        remote worker's process is on another machine)."""
        return {w.index: w.pid for w in self._workers if w.alive and w.pid and not w.remote}

    @property
    def worker_port(self) -> int | None:
        """The TCP port remote workers connect back to; None when workers are local."""
        return self._pool.listener_port

    def worker_places(self) -> dict[int, str]:
        """Where each live worker runs, by index: ``local``, or its host's name for it."""
        return {w.index: w.where for w in self._workers if w.alive}

    async def health(self) -> EngineHealth:
        async def ping(w: Worker) -> WorkerHealth:
            if w.alive:
                req = self._pool.next_req()
                try:
                    p = await self._pool.request(w, ipc.Ping(req=req), req, 5.0)
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
                        w.where,
                        p.tokens_read_ahead,
                    )
                except EngineError:
                    pass
            return WorkerHealth(w.index, w.pid, False, [], 0, 0, 0, 0, w.where)

        workers = list(await asyncio.gather(*(ping(w) for w in self._workers)))
        return EngineHealth(
            bool(workers) and all(w.alive for w in workers), workers, self._pool.restarts
        )

    # -- generation -----------------------------------------------------------------

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
        if request.request_id in self._by_request or self._admission.waiting(request.request_id):
            raise FerrousError(f"request id {request.request_id!r} is already running")
        try:
            await self._pick(request.model)  # loaded somewhere (waits for a replacement)
            worker, key = await self._admission.admit(
                request, on_wait, self._affinity.preferred(request)
            )
        except Stranded as exc:
            error = exc.reason is FinishReason.ERROR
            yield self._done(
                request.request_id,
                ipc.Finished.ended(
                    0,
                    exc.reason.value,
                    ErrorCode.ENGINE_ERROR.value if error else None,
                    str(exc) if error else None,
                ),
            )
            return
        if on_start is not None:
            try:
                await on_start()
            except BaseException:
                self._admission.leave(worker, request.model, key)
                raise
        spec = self._models.get(request.model)
        if spec is None:  # unloaded while the request waited for a slot
            self._admission.leave(worker, request.model, key)
            raise ModelNotFound(f"model {request.model!r} is not loaded")
        spec.active += 1
        spec.last_used = time.monotonic()
        try:
            ring: Ring | NetRing
            if worker.remote:  # its text comes over the connection (engine.netring)
                ring = NetRing(self.config.ring_capacity)
            else:
                ring = Ring.create(self.config.ring_capacity)
        except OSError as exc:
            # Out of file descriptors (EMFILE) or of /dev/shm (ENOSPC): the
            # server is out of a resource, not broken, and the caller may retry.
            self._residency.release(spec, request.keep_alive)
            self._admission.leave(worker, request.model, key)
            log.error("cannot create a ring for %s: %s", request.request_id, exc)
            raise Overloaded(
                f"the server cannot allocate a token ring now ({exc.strerror or exc})"
            ) from None
        except BaseException:
            self._residency.release(spec, request.keep_alive)
            self._admission.leave(worker, request.model, key)
            raise
        g = Gen(next(self._gen_ids), request.request_id, ring, worker)
        self._affinity.served(request, worker.index)
        worker.gens[g.gen] = g
        self._by_request[g.request_id] = g
        worker.send(
            ipc.Generate(
                gen=g.gen,
                request_id=request.request_id,
                model=request.model,
                ring=ring.name,
                prompt=request.prompt,
                messages=request.messages,
                sampling=request.sampling,
                token_ids=request.token_ids,
                stall_timeout=self.config.stall_timeout,
                truncate=request.truncate,
                max_prompt_tokens=request.max_prompt_tokens,
                prepare_timeout=self.config.prepare_timeout,
                priority=request.priority,
                tenant=request.tenant or "",
                tools=request.tools,
                tool_choice=request.tool_choice,
                tool_name=request.tool_name,
                parallel_tool_calls=request.parallel_tool_calls,
                adapters=request.adapters,
            )
        )
        if worker.interrupt is not None and self._admission.urgent(worker, request.model, key):
            worker.interrupt.set()  # read it now, not after the step in progress
        want_ids = request.token_ids
        loop = asyncio.get_running_loop()
        seq = 0
        try:
            while True:
                finished = g.finished  # read before the ring: data precedes Finished
                records, resume = ring.read()
                if resume:
                    tail = ring.tail if isinstance(ring, NetRing) else 0
                    worker.send(ipc.Resume(gen=g.gen, tail=tail))
                for ids, text, extra in records:
                    logprobs = _LOGPROBS.decode(extra) if extra else None
                    yield TokenDelta(text.decode("utf-8"), seq, ids if want_ids else None, logprobs)
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
                worker.send(ipc.Cancel(gen=g.gen))
            self._by_request.pop(g.request_id, None)
            ring.close()
            self._residency.release(spec, request.keep_alive)
            f = g.finished
            work = None if f is None else f.prompt_tokens - f.cached_tokens + f.completion_tokens
            self._admission.leave(worker, request.model, key, work)

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
        if self._admission.cancel(request_id):  # still waiting for a slot: it never starts
            return True
        g = self._by_request.get(request_id)
        if g is None or g.finished is not None:
            return False
        g.worker.send(ipc.Cancel(gen=g.gen))
        return True
