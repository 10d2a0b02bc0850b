"""Obtain the Silero VAD model (ONNX, MIT) from the ``silero-vad`` wheel.

Importing the package would pull in torch; the model is only read out of the
wheel: pip fetches it (honouring the user's index settings), the ONNX file is
extracted, its sha256 checked, and the folder cached under
``FERROUS_HOME/cache`` (whole, or not at all). ``ferrous pull silero-vad`` puts
the same files in the model store; this is the path tests and benchmarks use.

Command: ``python -m engine.silerovad`` prints the folder's path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from engine.smollm2 import ferrous_home, sha256_file
from engine.wheels import download_wheel, extract_member
from protocol.errors import EngineError

__all__ = ["SILERO_VAD_DIR", "fetch_silero_vad", "main"]

WHEEL = "silero-vad==6.2.3"
MEMBER = "silero_vad/data/silero_vad.onnx"
SHA256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"
SILERO_VAD_DIR = "silero-vad"


def fetch_silero_vad(cache_dir: Path | None = None) -> Path:
    """The path of a verified Silero VAD folder, downloaded on first use."""
    cache = cache_dir or ferrous_home() / "cache"
    target = cache / SILERO_VAD_DIR
    if (target / ".verified").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        wheel = download_wheel(WHEEL, Path(tmp))
        staged = Path(tmp) / SILERO_VAD_DIR
        staged.mkdir()
        part = extract_member(wheel, MEMBER, staged / "silero_vad.onnx")
        digest = sha256_file(part)
        if digest != SHA256:
            raise EngineError(f"{MEMBER} from {WHEEL} has sha256 {digest}, expected {SHA256}")
        (staged / ".verified").write_text(WHEEL)
        if target.exists():  # a folder left by an interrupted fetch: replaced
            os.replace(target, Path(tmp) / "old")
        os.replace(staged, target)
    return target


def main(argv: list[str] | None = None) -> int:
    print(fetch_silero_vad())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
