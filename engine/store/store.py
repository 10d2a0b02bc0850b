"""The on-disk model store: content-addressed blobs and manifests, crash-safe.

Layout under ``FERROUS_HOME/models``::

    blobs/sha256-<hex>            file contents, named by their digest, read-only
    manifests/<name>/<tag>.json   one manifest per model reference
    partial/                      downloads in progress (kept to resume them)
    tmp/                          files being written; emptied when a store opens
    trees/<id>/                   multi-file models laid out as folders (hard links)
    store.lock                    serialises admitting blobs, writing manifests, GC

Crash safety comes from one rule: nothing appears under its final name until it
is complete. Blobs are written (or downloaded) elsewhere, hashed, fsynced and
then renamed into ``blobs/``; manifests are written to ``tmp/``, fsynced and
renamed over the old one; the directory is fsynced after each rename. A crash
at any point leaves either the old state or the new one, plus litter in
``tmp/`` that the next open removes. Readers still check what they list: a
manifest that does not decode, or whose blobs are missing or of the wrong
size, is skipped with a warning rather than offered as a model.

Admitting a blob and writing the manifest that references it happen under an
exclusive lock on ``store.lock``, and so does garbage collection, so a
concurrent ``rm`` in another process can never collect a blob between its
arrival and its manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from engine.modelfacts import ModelFacts, facts_of
from engine.store.errors import StoreError, os_error
from engine.store.manifest import Layer, Manifest, decode_manifest, encode_manifest, manifest_digest
from engine.store.names import ModelRef, parse_ref
from protocol.errors import FerrousError

__all__ = ["ModelRecord", "ModelStore", "hash_file"]

log = logging.getLogger("ferrous.store")

_CHUNK = 1 << 20


def hash_file(path: Path) -> tuple[str, int]:
    """The sha256 hex digest and size of a file."""
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Facts of stored models by manifest digest (bounded; oldest dropped first).
_FACTS: dict[str, ModelFacts] = {}
_FACTS_MAX = 1024


class ModelRecord(msgspec.Struct, frozen=True):
    """A valid model in the store."""

    ref: ModelRef
    manifest: Manifest
    id: str  # sha256 of the manifest document
    modified: float  # when the manifest was written (Unix time)

    @property
    def size(self) -> int:
        return self.manifest.size


class ModelStore:
    """One store directory. Methods are blocking; call them through a thread from async code."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.partial = self.root / "partial"
        self.tmp = self.root / "tmp"
        self.trees = self.root / "trees"
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None
        try:
            # Private: models may be a tenant's own, and sources record where they came from.
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            for d in (self.blobs, self.manifests, self.partial, self.tmp, self.trees):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise os_error(exc, "opening the model store") from None
        self._clean_tmp()

    # -- locking ------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes; re-entrant within a thread."""
        with self._thread_lock:
            if self._depth == 0:
                try:
                    fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as exc:
                    raise os_error(exc, "locking the model store") from None
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    os.close(self._lock_fd)
                    self._lock_fd = None

    def _clean_tmp(self) -> None:
        """Remove litter from writes that a crash interrupted (only when nobody holds the lock)."""
        try:
            fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return  # another process is writing: its temp files are live
        try:
            for p in self.tmp.iterdir():
                pid = p.name.partition("-")[0]
                if pid.isdigit() and _alive(int(pid)):
                    continue  # another live process is staging it
                with contextlib.suppress(OSError):
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- blobs --------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64:
            raise StoreError("invalid", f"bad blob digest {digest!r}")
        return self.blobs / f"sha256-{hexdigest}"

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except OSError:
            return False
        return size is None or st.st_size == size

    def admit(self, path: Path, sha256: str) -> Layer:
        """Rename ``path`` (complete, fsynced, hashed to ``sha256``) into the blobs.

        ``path`` must be on the store's file system (``tmp/`` or ``partial/``).
        Call with the store lock held when a manifest will reference the blob,
        so a concurrent GC cannot collect it first.
        """
        digest = f"sha256:{sha256}"
        target = self.blob_path(digest)
        try:
            if target.exists():
                path.unlink(missing_ok=True)
            else:
                os.chmod(path, 0o440)  # read-only, and not for other users
                os.replace(path, target)
                _fsync_dir(self.blobs)
            if path.parent == self.partial:
                # A finished download: its resume sidecar (<key>.json) has nothing left to do.
                path.with_suffix(".json").unlink(missing_ok=True)
            return Layer(digest, target.stat().st_size, target.name)
        except OSError as exc:
            raise os_error(exc, f"storing {path.name}") from None

    def stage_file(self, path: Path) -> tuple[Path, str, int]:
        """Copy a local file into ``tmp/``, hashing it on the way: (staged path, sha256, size).

        Hand the result to :meth:`commit`, which admits it as a blob.
        """
        try:
            tmp = self.temp_path("import-")
            digest, size = self._copy_in(path, tmp)
        except OSError as exc:
            raise os_error(exc, f"importing {path}") from None
        return tmp, digest, size

    def temp_path(self, prefix: str) -> Path:
        """A fresh file name in ``tmp/``, tagged with this process's id for crash clean-up."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=f"{os.getpid()}-{prefix}")
        os.close(fd)
        return Path(name)

    def commit(
        self, ref: ModelRef, manifest: Manifest, staged: dict[str, Path] | None = None
    ) -> ModelRecord:
        """Admit ``staged`` files (digest -> path) as blobs and write ``ref``'s manifest.

        One critical section, so garbage collection never sees the blobs
        without the manifest that keeps them.
        """
        with self.locked():
            for digest, path in (staged or {}).items():
                self.admit(path, digest.removeprefix("sha256:"))
            return self.put(ref, manifest)

    def _copy_in(self, src: Path, dst: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        with src.open("rb") as fin, dst.open("wb") as fout:
            while chunk := fin.read1(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                n += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        return h.hexdigest(), n

    # -- manifests ----------------------------------------------------------------------

    def _manifest_path(self, ref: ModelRef) -> Path:
        return self.manifests.joinpath(*ref.name.split("/"), f"{ref.tag}.json")

    def put(self, ref: ModelRef, manifest: Manifest) -> ModelRecord:
        """Write ``ref``'s manifest atomically; every blob it names must be in the store."""
        data = encode_manifest(manifest)
        target = self._manifest_path(ref)
        with self.locked():
            for f in manifest.layers:
                if not self.has_blob(f.digest, f.size):
                    raise StoreError("io", f"blob {f.digest} of {ref} is missing from the store")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp_name = self.temp_path("manifest-")
                fd = os.open(tmp_name, os.O_WRONLY)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp_name, target)
                _fsync_dir(target.parent)
            except OSError as exc:
                raise os_error(exc, f"writing the manifest of {ref}") from None
        return ModelRecord(ref, manifest, manifest_digest(data), time.time())

    def _read(self, ref: ModelRef, path: Path) -> ModelRecord | None:
        try:
            data = path.read_bytes()
            mtime = path.stat().st_mtime
        except OSError:
            return None
        try:
            manifest = decode_manifest(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("ignoring the manifest of %s: %s", ref, exc)
            return None
        for f in manifest.layers:
            if not self.has_blob(f.digest, f.size):
                log.warning("ignoring %s: its blob %s is missing or damaged", ref, f.digest)
                return None
        return ModelRecord(ref, manifest, manifest_digest(data), mtime)

    def get(self, ref: ModelRef | str) -> ModelRecord:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        record = self._read(r, self._manifest_path(r))
        if record is None:
            raise StoreError("not_found", f"model {r.short!r} is not in the store")
        return record

    def has(self, ref: ModelRef) -> bool:
        """Whether a manifest exists for ``ref`` (a stat, not a read: cheap on every request)."""
        return self._manifest_path(ref).is_file()

    def stage_links(self, other: ModelStore, layers: list[Layer]) -> dict[str, Path]:
        """Stage ``other``'s blobs for ``layers`` that this store lacks: digest -> path in ``tmp/``.

        Blobs are hard-linked when both stores share a file system (no copy,
        no extra disk), else copied. Hand the result to :meth:`commit`. This
        is how a tenant's model built FROM a shared one gets its bytes
        without the stores sharing a blob directory (whose garbage
        collection would then have to know every tenant's manifests).
        """
        staged: dict[str, Path] = {}
        for layer in layers:
            if layer.digest in staged or self.has_blob(layer.digest, layer.size):
                continue
            src = other.blob_path(layer.digest)
            tmp = self.temp_path("link-")
            try:
                tmp.unlink()
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
            except OSError as exc:
                raise os_error(exc, f"linking blob {layer.digest}") from None
            staged[layer.digest] = tmp
        return staged

    def find(self, ref: ModelRef | str) -> ModelRecord | None:
        try:
            return self.get(ref)
        except StoreError:
            return None

    def models(self) -> list[ModelRecord]:
        """Every valid model, sorted by name then tag."""
        out: list[ModelRecord] = []
        for path in sorted(self.manifests.rglob("*.json")):
            rel = path.relative_to(self.manifests)
            name = "/".join(rel.parts[:-1])
            try:
                ref = parse_ref(f"{name}:{rel.stem}")
            except StoreError:
                continue
            record = self._read(ref, path)
            if record is not None:
                out.append(record)
        return out

    def copy(self, src: ModelRef | str, dst: ModelRef | str) -> ModelRecord:
        """Point ``dst`` at ``src``'s manifest (blobs are shared, nothing is copied)."""
        record = self.get(src)
        target = parse_ref(dst) if isinstance(dst, str) else dst
        return self.put(target, record.manifest)

    def remove(self, ref: ModelRef | str) -> list[str]:
        """Delete a model and collect the blobs nothing references any more."""
        r = parse_ref(ref) if isinstance(ref, str) else ref
        path = self._manifest_path(r)
        with self.locked():
            try:
                path.unlink()
            except FileNotFoundError:
                raise StoreError("not_found", f"model {r.short!r} is not in the store") from None
            except OSError as exc:
                raise os_error(exc, f"removing {r}") from None
            with contextlib.suppress(OSError):
                parent = path.parent
                while parent != self.manifests and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent
            return self.gc()

    def gc(self) -> list[str]:
        """Remove unreferenced blobs and trees; returns the digests removed."""
        with self.locked():
            keep: set[str] = set()
            ids: set[str] = set()
            for path in self.manifests.rglob("*.json"):
                try:
                    data = path.read_bytes()
                    manifest = decode_manifest(data)
                except (OSError, msgspec.ValidationError, msgspec.DecodeError):
                    continue
                keep.update(f.digest for f in manifest.layers)
                ids.add(manifest_digest(data))
            removed: list[str] = []
            for blob in self.blobs.iterdir():
                digest = "sha256:" + blob.name.removeprefix("sha256-")
                if digest not in keep:
                    with contextlib.suppress(OSError):
                        blob.unlink()
                        removed.append(digest)
            for tree in self.trees.iterdir():
                if tree.name not in ids:
                    shutil.rmtree(tree, ignore_errors=True)
            return removed

    # -- loading ------------------------------------------------------------------------

    def facts(self, record: ModelRecord) -> ModelFacts | None:
        """What ``record``'s files say it is (engine.modelfacts); None when this store
        lacks them. Cached by manifest digest: a stored model never changes."""
        cached = _FACTS.get(record.id)
        if cached is not None:
            return cached
        if not all(self.has_blob(f.digest) for f in record.manifest.files):
            return None
        try:
            found = facts_of(self.model_path(record))
        except FerrousError:
            found = ModelFacts(format=record.manifest.format)
        if len(_FACTS) >= _FACTS_MAX:
            with contextlib.suppress(StopIteration, RuntimeError, KeyError):
                _FACTS.pop(next(iter(_FACTS)))
        _FACTS[record.id] = found
        return found

    def adapter_paths(self, record: ModelRecord) -> list[Path]:
        """The blobs of ``record``'s LoRA adapters, in order."""
        return [self.blob_path(a.digest) for a in record.manifest.adapters]

    def model_path(self, record: ModelRecord) -> Path:
        """The path to hand to a backend: the GGUF blob, or a folder for multi-file models."""
        m = record.manifest
        if m.format == "gguf" and len(m.files) == 1:
            return self.blob_path(m.files[0].digest)
        tree = self.trees / record.id
        if tree.is_dir():
            return tree
        with self.locked():
            if tree.is_dir():
                return tree
            try:
                staging = Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"{os.getpid()}-tree-"))
                for f in m.files:
                    dst = staging / f.path
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(self.blob_path(f.digest), dst)
                os.replace(staging, tree)
                _fsync_dir(self.trees)
            except OSError as exc:
                raise os_error(exc, f"laying out {record.ref}") from None
        return tree
