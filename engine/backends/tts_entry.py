"""Registry entry of speech synthesis models: hibari voices.

A voice is a folder with ``voice.onnx`` (the model: phoneme ids and a speed
in, the vocoder's parameters out) and ``voice.json`` naming its engine
(``"engine": "hibari"``), its voice and whether it speaks British English
(which picks the spelling-to-sound rules). ``python -m engine.hibarivoices``
writes the folder of the voice that ships inside the ``hibari-tts`` wheel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.backends.entry import BackendEntry, Found, Kind, Sizing, SizingInputs
from engine.memory import COMPUTE_RESERVE, folder_bytes
from protocol.errors import ModelLoadError

__all__ = ["HibariEntry", "read_voice"]


def _voice_json(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "voice.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_voice(path: str) -> tuple[Path, dict[str, Any]]:
    """The voice folder and its ``voice.json``, checked; raise ModelLoadError."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(
            path, "not_voice", "a voice is a folder with voice.onnx and voice.json"
        )
    meta = _voice_json(folder)
    if meta is None or meta.get("engine") != "hibari":
        raise ModelLoadError(path, "config", "voice.json is missing or does not name engine hibari")
    if not (folder / "voice.onnx").is_file():
        raise ModelLoadError(path, "not_voice", "the folder has no voice.onnx")
    return folder, meta


class HibariEntry(BackendEntry):
    name = "hibari"
    kinds = frozenset({Kind.TTS})
    layout = "a folder with voice.onnx and voice.json (engine hibari)"
    package = "hibari"
    install = "'ferrousforge[voice]'"
    module = "engine.backends.hibarivoice"
    cls = "HibariBackend"

    def claims(self, path: str) -> bool:
        meta = _voice_json(Path(path))
        return meta is not None and meta.get("engine") == "hibari"

    def inspect(self, path: str) -> Found:
        read_voice(path)
        return Found(path, self.name, frozenset({Kind.TTS}))

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        # The model in each worker, plus its phonemizer's lexicons (~40 MB unpacked).
        per_worker = folder_bytes(found.path) + 48 * 2**20 + COMPUTE_RESERVE
        return Sizing(1, inputs.workers * per_worker)
