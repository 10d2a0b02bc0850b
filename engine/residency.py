"""Which models are in memory: loading into every worker, the memory budget, keep-alive.

A model is loaded into every worker under one name. Before any worker sees
a file it is checked (a typed error for a bad one) and sized from its header
(engine.memory): the weights once (workers share the memory-mapped file), and
per worker the sequence windows, logits and a compute reserve; the number of
sequence windows is chosen here too (as many as half the budget holds, up to
``SEQS_PER_THREAD`` per thread). Idle models are unloaded least recently used
first to make room; a model with running generations is never evicted; one
that cannot fit is refused (``too_large`` beyond the whole budget,
``overloaded`` while busy models hold the room). ``keep_alive`` unloads a
model once it has been idle that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from engine import ipc
from engine.backends.entry import SizingInputs
from engine.backends.registry import find_entry
from engine.memory import default_budget
from engine.pool import WAKE_SAFETY_S, Worker, WorkerPool
from engine.settings import EngineConfig
from protocol.errors import (
    EngineError,
    FerrousError,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    TooLarge,
    error_from_code,
)

__all__ = ["LoadedModel", "ModelInfo", "ModelSpec", "Residency"]

log = logging.getLogger("ferrous.engine")


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
    load_ms: float = 0.0  # how long loading it took (the slowest worker)
    providers: list[str] = []  # execution providers (ONNX models), preferred first


@dataclass
class ModelSpec:
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
    load_ms: float = 0.0  # the slowest worker's load of it
    providers: list[str] = field(default_factory=list)
    options: msgspec.Struct | None = None  # its backend's options
    options_data: bytes = b""  # the same, encoded for the workers

    def touch(self, keep_alive: float) -> None:
        now = time.monotonic()
        self.last_used = now
        self.expires = None if keep_alive < 0 else now + keep_alive


class Residency:
    """The loaded models of one engine, within its memory budget."""

    def __init__(
        self, config: EngineConfig, pool: WorkerPool, notify: Callable[[], Awaitable[None]]
    ) -> None:
        self.config = config
        self._pool = pool
        self._notify = notify
        self.models: dict[str, ModelSpec] = {}
        self.memory_budget = config.memory_budget or default_budget()
        self._load_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._load_lock = asyncio.Lock()
        self._spawn(self.expire(), "engine-keep-alive")

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def slots(self, model: str) -> int:
        """Sequences of ``model`` each worker runs at once."""
        spec = self.models.get(model)
        return spec.n_seq if spec is not None else 1

    def acquire(self, model: str) -> ModelSpec:
        """A generation or embedding starts on ``model``: it stays loaded meanwhile."""
        spec = self.models.get(model)
        if spec is None:
            raise ModelNotFound(f"model {model!r} is not loaded")
        spec.active += 1
        spec.last_used = time.monotonic()
        return spec

    async def reload(self, new: Worker) -> None:
        """A replacement worker is up: load every model into it."""
        for spec in list(self.models.values()):
            try:
                await self._load_on(new, spec)
            except FerrousError as exc:
                log.error("reloading %s into worker %d failed: %s", spec.name, new.index, exc)

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
        spec = ModelSpec(name, os.path.abspath(os.fspath(path)), backend, n_ctx, chat_template)
        # Reject bad files here, with a typed error, before any worker sees them;
        # then size the model for the budget (engine.backends.entry).
        entry = find_entry(spec.path, backend or None)
        found = entry.inspect(spec.path)
        spec.backend = found.backend  # what runs it, as ps shows it (not "auto")
        spec.options = entry.options_of(self.config.options)
        sizing = entry.size(
            found,
            SizingInputs(
                n_ctx=n_ctx,
                workers=max(1, len(self._pool.workers)),
                threads=self.config.threads_per_worker,
                seqs_cap=self.config.seqs_per_worker,
                memory_budget=self.memory_budget,
                n_batch=self.config.n_batch,
                kv_unified=self.config.kv_unified,
                options=spec.options,
            ),
        )
        spec.n_seq, spec.size = sizing.n_seq, sizing.size
        spec.options_data = entry.encode_options(spec.options)
        assert self._load_lock is not None
        async with self._load_lock:
            await self._make_room(spec)
            results = await asyncio.gather(
                *(self._load_on(w, spec) for w in self._pool.workers if w.alive),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors or not results:
                for w in self._pool.workers:
                    if name in w.models and name not in self.models:
                        await self._unload_on(w, name)
                if errors:
                    raise errors[0]
                raise EngineError("no live worker to load the model into", retryable=True)
            loaded = [r for r in results if isinstance(r, ipc.ModelLoaded)]
            spec.loaded_n_ctx = loaded[0].n_ctx
            spec.loaded_at = time.time()
            spec.load_ms = max(r.load_ms for r in loaded)
            spec.providers = list(loaded[0].providers)
            spec.touch(self.config.keep_alive if keep_alive is None else keep_alive)
            self.models[name] = spec
        await self._notify()
        return ModelInfo(
            name,
            spec.path,
            spec.backend,
            loaded[0].n_ctx,
            spec.load_ms,
            spec.size,
        )

    async def _make_room(self, spec: ModelSpec) -> None:
        """Unload idle models, least recently used first, until ``spec`` fits the budget."""
        budget = self.memory_budget
        mib = 1024 * 1024
        if spec.size > budget:
            raise TooLarge(
                f"model {spec.name!r} needs about {spec.size // mib} MiB but the engine's memory "
                f"budget is {budget // mib} MiB (set engine memory_budget, or a smaller num_ctx)"
            )
        others = [s for s in self.models.values() if s.name != spec.name]
        used = sum(s.size for s in others)
        for victim in sorted((s for s in others if s.active == 0), key=lambda s: s.last_used):
            if used + spec.size <= budget:
                break
            log.info("unloading %s (idle) to make room for %s", victim.name, spec.name)
            del self.models[victim.name]
            await asyncio.gather(
                *(self._unload_on(w, victim.name) for w in self._pool.workers if w.alive)
            )
            used -= victim.size
        if used + spec.size > budget:
            busy = ", ".join(s.name for s in self.models.values() if s.name != spec.name)
            raise Overloaded(
                f"model {spec.name!r} needs about {spec.size // mib} MiB; the memory budget "
                f"({budget // mib} MiB) is held by models with running generations ({busy})"
            )

    async def _load_on(self, w: Worker, spec: ModelSpec) -> ipc.ModelLoaded:
        req = self._pool.next_req()
        msg = ipc.LoadModel(
            req=req,
            model=spec.name,
            path=spec.path,
            backend=spec.backend,
            n_ctx=spec.n_ctx,
            n_threads=self.config.threads_per_worker,
            n_batch=self.config.n_batch,
            n_seq=spec.n_seq,
            chat_template=spec.chat_template,
            options=spec.options_data,
            prefill_chunk=self.config.prefill_chunk,
            kv_unified=self.config.kv_unified,
        )
        w.loading += 1
        try:
            reply = await self._pool.request(w, msg, req, self.config.load_timeout)
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
        if self.models.pop(name, None) is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        await asyncio.gather(*(self._unload_on(w, name) for w in self._pool.workers if w.alive))

    def loaded(self) -> list[LoadedModel]:
        """The models in memory, most recently used first."""
        now_mono, now = time.monotonic(), time.time()
        return [
            LoadedModel(
                s.name,
                s.path,
                s.backend,
                s.loaded_n_ctx,
                s.size,
                s.active,
                s.loaded_at,
                None if s.expires is None or s.active else now + (s.expires - now_mono),
                s.load_ms,
                list(s.providers),
            )
            for s in sorted(self.models.values(), key=lambda s: -s.last_used)
        ]

    def set_keep_alive(self, name: str, keep_alive: float) -> None:
        """Change how long ``name`` stays loaded once idle (0 unloads it when idle)."""
        spec = self.models.get(name)
        if spec is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        spec.touch(keep_alive)
        if keep_alive == 0 and spec.active == 0:
            self._unload_soon(spec, "keep_alive is 0")

    async def _unload_on(self, w: Worker, name: str) -> None:
        req = self._pool.next_req()
        with contextlib.suppress(EngineError):
            await self._pool.request(w, ipc.UnloadModel(req=req, model=name), req, 60.0)
        w.models.pop(name, None)

    def _unload_soon(self, spec: ModelSpec, why: str) -> None:
        if spec.unloading or self.models.get(spec.name) is not spec:
            return
        spec.unloading = True
        log.info("unloading %s: %s", spec.name, why)
        self._spawn(self._unload_spec(spec), f"unload {spec.name}")

    async def _unload_spec(self, spec: ModelSpec) -> None:
        assert self._load_lock is not None
        async with self._load_lock:
            if self.models.get(spec.name) is not spec or spec.active:
                spec.unloading = False
                return
            del self.models[spec.name]
            await asyncio.gather(
                *(self._unload_on(w, spec.name) for w in self._pool.workers if w.alive)
            )

    async def expire(self) -> None:
        """Unload models whose keep_alive ran out while idle (checked once a second)."""
        while True:
            await asyncio.sleep(WAKE_SAFETY_S)
            now = time.monotonic()
            for spec in list(self.models.values()):
                if spec.active == 0 and spec.expires is not None and now >= spec.expires:
                    self._unload_soon(spec, "its keep_alive expired")

    def release(self, spec: ModelSpec, keep_alive: float | None) -> None:
        spec.active -= 1
        spec.touch(self.config.keep_alive if keep_alive is None else keep_alive)
        if spec.active == 0 and spec.expires is not None and spec.expires <= spec.last_used:
            self._unload_soon(spec, "keep_alive is 0")
