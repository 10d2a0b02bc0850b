"""A hibari voice as a model folder, from the ``hibari-tts`` wheel.

The wheel (installed with ``ferrousforge[voice]``) carries one voice,
``heart`` (American English). This writes its folder — ``voice.onnx``, its
sha256 checked against hibari's own registry, and ``voice.json`` — under
``FERROUS_HOME/cache``, whole or not at all. Other voices are separate model
files; nothing here downloads one.

Command: ``python -m engine.hibarivoices`` prints the folder's path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.smollm2 import ferrous_home, sha256_file
from protocol.errors import EngineError

__all__ = ["fetch_hibari_voice", "main"]


def fetch_hibari_voice(voice: str = "heart", cache_dir: Path | None = None) -> Path:
    """The folder of a hibari voice that ships in the installed wheel."""
    from hibari.voices import VOICES, voice_path

    spec = VOICES.get(voice)
    if spec is None or not spec.get("bundled"):
        raise EngineError(f"hibari voice {voice!r} is not in the installed package")
    cache = cache_dir or ferrous_home() / "cache"
    target = cache / f"hibari-{voice}"
    if (target / "voice.json").is_file():
        return target
    source = Path(voice_path(voice, download_missing=False))
    digest = sha256_file(source)
    if digest != spec["sha256"]:
        raise EngineError(f"{source} has sha256 {digest}, expected {spec['sha256']}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        staged = Path(tmp) / target.name
        staged.mkdir()
        shutil.copyfile(source, staged / "voice.onnx")
        meta = {
            "engine": "hibari",
            "voice": voice,
            "british": bool(spec.get("british", False)),
            "language": spec.get("language", ""),
            "sha256": digest,
        }
        (staged / "voice.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if target.exists():  # left by an interrupted fetch: replaced
            os.replace(target, Path(tmp) / "old")
        os.replace(staged, target)
    return target


def main(argv: list[str] | None = None) -> int:
    print(fetch_hibari_voice())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
