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
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from engine import ChatMessage
from engine.interface import Engine
from engine.requests import Adapter
from engine.store.download import Downloader
from engine.store.manifest import Manifest, ParamValue
from engine.store.modelfile import Modelfile
from engine.store.names import ModelRef, parse_ref
from engine.store.netpolicy import AddressPolicy
from engine.store.pull import ModelManager, PullEvent, PullListener
from engine.store.sources import is_source
from engine.store.store import ModelRecord, ModelStore
from gateway.config import ServerConfig, parse_size, private_home
from protocol.durations import parse_duration
from protocol.errors import BadRequest, FerrousError, ModelNotFound
from protocol.messages import AdapterChoice

__all__ = [
    "ModelRegistry",
    "ResolvedModel",
    "pull_progress",
    "seed_messages",
    "tenant_slug",
]

TENANT_KEY_PREFIX = "~"  # never the first character of a model name
MAX_OPEN_TENANT_STORES = 1024  # tenant stores kept open (a store object is small)
NAMES_TTL = 2.0  # seconds the list of model names offered in ``ready`` is reused


class ResolvedModel(msgspec.Struct, frozen=True):
    """What a request needs to know about the model it names."""

    key: str  # the engine's name for it (a model with adapters: maybe its base's)
    manifest: Manifest | None = None  # None for config entries
    adapters: tuple[Adapter, ...] = ()  # its own LoRA adapters (Modelfile ADAPTER)


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


def tenant_slug(tenant: str) -> str:
    """A tenant's directory and engine-key segment: readable, and unique by its hash."""
    safe = re.sub(r"[^a-z0-9._-]+", "-", tenant.lower()).strip("-._")[:32] or "tenant"
    return f"{safe}-{hashlib.sha256(tenant.encode()).hexdigest()[:12]}"


class ModelRegistry:
    """Resolves names and makes sure the engine has the model loaded.

    Models live in namespaces: the shared store (``FERROUS_HOME/models``:
    configured, catalogued and operator-made models, read-only to tenants) and
    one store per tenant (``FERROUS_HOME/tenants/<slug>/models``), visible to
    that tenant only. A tenant's names resolve in its own store first, then in
    the shared one. A tenant model's engine key is ``~<slug>/<name:tag>``, so
    two tenants' models of one name never meet in the engine. Who may do what
    is decided by :class:`gateway.namespaces.ModelView`, not here.
    """

    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.home = private_home(config)
        self.manager = self._new_manager(ModelStore(self.home / "models"))
        self._tenants: OrderedDict[str, ModelManager] = OrderedDict()
        self._loading: dict[str, asyncio.Task[ResolvedModel]] = {}
        self._resolved: dict[str, ResolvedModel] = {}
        self._names: tuple[float, list[str]] | None = None

    def _new_manager(self, store: ModelStore) -> ModelManager:
        """A manager whose downloads keep to ``[sources]``: public addresses (plus
        ``allow_hosts``) on every hop, the per-pull cap and the partial quota."""
        sources = self.config.sources
        downloader = Downloader(
            store.partial,
            policy=AddressPolicy(sources.allow_hosts),
            max_bytes=parse_size(sources.max_pull_bytes, key="sources.max_pull_bytes"),
            partial_quota=parse_size(sources.partial_quota, key="sources.partial_quota"),
            partial_max_age=parse_duration(
                sources.partial_max_age, field="sources.partial_max_age"
            ),
        )
        return ModelManager(store, dict(self.config.catalog), downloader=downloader)

    def manager_for(self, tenant: str | None) -> ModelManager:
        """The store of ``tenant`` (None: the shared store), opened on first use."""
        if tenant is None:
            return self.manager
        manager = self._tenants.get(tenant)
        if manager is None:
            root = self.home / "tenants" / tenant_slug(tenant) / "models"
            manager = self._new_manager(ModelStore(root))
            self._tenants[tenant] = manager
            while len(self._tenants) > MAX_OPEN_TENANT_STORES:
                self._tenants.popitem(last=False)
        self._tenants.move_to_end(tenant)
        return manager

    @property
    def default_keep_alive(self) -> float:
        return parse_duration(self.config.keep_alive)

    def shared_names(self) -> list[str]:
        """Names every caller may ask for (configured, shared store, catalogued).

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

    def names(self, tenant: str | None = None) -> list[str]:
        """Names ``tenant`` may ask for: its own stored models first, then the shared names."""
        shared = self.shared_names()
        if tenant is None:
            return shared
        own = sorted(r.ref.short for r in self.manager_for(tenant).store.models())
        return list(dict.fromkeys([*own, *shared]))

    def is_shared_name(self, name: str) -> bool:
        """Whether ``name`` resolves outside any tenant: configured, stored shared, catalogued."""
        if name in self.config.models or self.manager.catalog_entry(name) is not None:
            return True
        try:
            return self.manager.store.has(parse_ref(name))
        except FerrousError:
            return False

    def _changed(self, key: str) -> None:
        """A stored model changed: forget what was resolved, reload it once it is idle."""
        self._names = None
        self._resolved.pop(key, None)
        if key in self.engine.models():
            self.engine.set_keep_alive(key, 0)

    def tenant_prefix(self, tenant: str) -> str:
        """The start of every engine key of ``tenant``'s models."""
        return f"{TENANT_KEY_PREFIX}{tenant_slug(tenant)}/"

    def engine_key(self, tenant: str | None, ref: ModelRef) -> str:
        return f"{self.tenant_prefix(tenant)}{ref}" if tenant else str(ref)

    def forget(self, key: str) -> None:
        """An unloaded model: resolve it afresh next time."""
        self._resolved.pop(key, None)

    def owner_of(self, key: str) -> str | None:
        """The tenant slug an engine key belongs to (None: shared)."""
        if not key.startswith(TENANT_KEY_PREFIX):
            return None
        return key[1:].partition("/")[0]

    def display_name(self, key: str) -> str:
        """What a client sees of an engine key: the model name, without the tenant prefix."""
        if not key.startswith(TENANT_KEY_PREFIX):
            return key
        return key.partition("/")[2]

    def tenant_has(self, tenant: str | None, name: str) -> ModelRef | None:
        """``name``'s reference when ``tenant``'s own store holds it."""
        if tenant is None or name in self.config.models:
            return None
        try:
            ref = parse_ref(name)
        except FerrousError:
            return None
        return ref if self.manager_for(tenant).store.has(ref) else None

    def key_for(self, name: str, tenant: str | None = None) -> str:
        """The engine's name for ``name`` as ``tenant`` resolves it."""
        ref = self.tenant_has(tenant, name)
        if ref is not None:
            return self.engine_key(tenant, ref)
        return name if name in self.config.models else self._key(name)

    async def ensure(
        self,
        name: str,
        *,
        tenant: str | None = None,
        keep_alive: float | None = None,
        n_ctx: int | None = None,
    ) -> ResolvedModel:
        """Load ``name`` if it is not loaded; returns the engine key and its manifest.

        ``n_ctx`` overrides the context length when this call is the one that loads it.
        """
        key = self.key_for(name, tenant)
        resolved = self._resolved.get(key)
        if resolved is not None and resolved.key in self.engine.models():
            return resolved
        task = self._loading.get(key)
        if task is None:
            owner = tenant if self.owner_of(key) is not None else None
            task = asyncio.create_task(
                self._load(name, key, owner, keep_alive, n_ctx), name=f"load {key}"
            )
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
        self,
        name: str,
        key: str,
        tenant: str | None,
        keep_alive: float | None,
        n_ctx: int | None,
    ) -> ResolvedModel:
        entry = self.config.models.get(name) if tenant is None else None
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
            manager = self.manager_for(tenant)
            try:
                record = await manager.resolve(name, pull=self.config.auto_pull and not tenant)
            except FerrousError as exc:
                if exc.code.value == "model_not_found":
                    raise ModelNotFound(exc.message) from None
                raise
            adapters = tuple(Adapter(str(p)) for p in manager.store.adapter_paths(record))
            shared = await self._shared_base(manager, record, tenant, keep_alive, n_ctx)
            if shared is not None:
                resolved = ResolvedModel(shared.key, record.manifest, adapters)
            else:
                await self.load_record(
                    record, keep_alive=keep_alive, n_ctx=n_ctx, key=key, manager=manager
                )
                resolved = ResolvedModel(key, record.manifest, adapters)
        self._resolved[key] = resolved
        return resolved

    async def _shared_base(
        self,
        manager: ModelManager,
        record: ModelRecord,
        tenant: str | None,
        keep_alive: float | None,
        n_ctx: int | None,
    ) -> ResolvedModel | None:
        """The loaded base a model with adapters runs on, when it is its parent as loaded:
        the same files, template and context length (then its generations share the
        parent's weights in the workers, with its adapters applied per sequence)."""
        man = record.manifest
        if not man.adapters or man.parent is None or n_ctx:
            return None
        parent = await manager.find(man.parent)
        if parent is None or parent.manifest.adapters:
            return None
        pm = parent.manifest
        if (
            [f.digest for f in pm.files] != [f.digest for f in man.files]
            or pm.template != man.template
            or _int_param(pm.parameters, "num_ctx") != _int_param(man.parameters, "num_ctx")
        ):
            return None
        return await self.ensure(str(parent.ref), tenant=tenant, keep_alive=keep_alive)

    async def adapters_for(
        self, resolved: ResolvedModel, choices: list[AdapterChoice], tenant: str | None
    ) -> tuple[Adapter, ...]:
        """The adapter files ``choices`` name, for a generation on ``resolved``: each a
        model made with ADAPTER over the same base (BadRequest otherwise)."""
        base = resolved.manifest
        if base is None or base.format != "gguf":
            raise BadRequest("adapters apply to GGUF models of the store")
        out: list[Adapter] = []
        for choice in choices:
            mine = self.tenant_has(tenant, choice.name) is not None
            manager = self.manager_for(tenant) if mine else self.manager
            record = await manager.find(choice.name)
            if record is None or not record.manifest.adapters:
                raise BadRequest(f"{choice.name!r} is not a model with an adapter (ADAPTER)")
            if [f.digest for f in record.manifest.files] != [f.digest for f in base.files]:
                raise BadRequest(f"the adapter of {choice.name!r} was made over another base model")
            out += [Adapter(str(p), choice.scale) for p in manager.store.adapter_paths(record)]
        return tuple(out)

    async def load_record(
        self,
        record: ModelRecord,
        *,
        keep_alive: float | None = None,
        n_ctx: int | None = None,
        key: str | None = None,
        manager: ModelManager | None = None,
    ) -> None:
        store = (manager or self.manager).store
        path: Path = await asyncio.to_thread(store.model_path, record)
        man = record.manifest
        await self.engine.load(
            key or str(record.ref),
            path,
            n_ctx=n_ctx or _int_param(man.parameters, "num_ctx"),
            chat_template=man.template,
            keep_alive=keep_alive,
        )

    async def pull(
        self,
        name: str,
        *,
        tenant: str | None = None,
        source: str | None = None,
        sha256: str | None = None,
        progress: PullListener | None = None,
    ) -> ModelRecord:
        """Pull into ``tenant``'s store (a catalog name without a source: the shared store,
        since a catalogued model is the same verified bytes whoever asks)."""
        shared = source is None and self.manager.catalog_entry(name) is not None
        target = None if shared else tenant
        record = await self.manager_for(target).pull(
            name, source=source, sha256=sha256, progress=progress
        )
        self._changed(self.engine_key(target, record.ref))
        return record

    async def create(
        self,
        name: str,
        modelfile: Modelfile,
        *,
        tenant: str | None = None,
        quantize: str | None = None,
    ) -> ModelRecord:
        """Build ``name`` in ``tenant``'s store; FROM a shared model links its blobs."""
        manager = self.manager_for(tenant)
        parent: ModelRecord | None = None
        if tenant is not None and self.tenant_has(tenant, modelfile.from_) is None:
            parent = await self._shared_record(modelfile.from_)
        record = await manager.create(
            name,
            modelfile,
            parent=parent,
            parent_store=self.manager.store if parent is not None else None,
            quantize=quantize,
        )
        self._changed(self.engine_key(tenant, record.ref))
        return record

    async def _shared_record(self, name: str) -> ModelRecord | None:
        """A shared stored (or catalogued, then pulled) model called ``name``, else None."""
        if is_source(name):
            return None
        record = await self.manager.find(name)
        if record is None and self.manager.catalog_entry(name) is not None:
            record = await self.manager.pull(name)
        return record

    async def copy(
        self, source: str, destination: str, *, tenant: str | None = None
    ) -> ModelRecord:
        if tenant is not None and self.tenant_has(tenant, source) is None:
            # A shared model copied into a tenant's namespace: the same manifest, linked blobs.
            return await self.create(destination, Modelfile(from_=source), tenant=tenant)
        record = await self.manager_for(tenant).copy(source, destination)
        self._changed(self.engine_key(tenant, record.ref))
        return record

    async def unload(self, name: str, *, tenant: str | None = None) -> str:
        """Unload a model now (its running generations end as cancelled); returns its key."""
        key = (
            name if tenant is None and name in self.engine.models() else self.key_for(name, tenant)
        )
        await self.engine.unload(key)
        self._resolved.pop(key, None)
        return key

    async def remove(self, name: str, *, tenant: str | None = None) -> list[str]:
        ref = parse_ref(name)
        key = self.engine_key(tenant, ref)
        if key in self.engine.models():
            await self.engine.unload(key)
        removed = await self.manager_for(tenant).remove(name)
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
    start: Callable[[PullListener], Awaitable[ModelRecord]],
) -> AsyncGenerator[PullEvent | ModelRecord, None]:
    """A pull as a stream: progress events, then the stored model (or its FerrousError raised).

    ``start`` begins the pull with the progress listener it is given.

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

    task = asyncio.ensure_future(start(on_progress))
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
