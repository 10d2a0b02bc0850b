"""Registry entry of Whisper speech recognition models in CTranslate2's layout (faster-whisper).

Claimed by layout: a folder with ``model.bin`` and a ``config.json`` that
names Whisper's special token ids (``suppress_ids`` and ``lang_ids``), which
other CTranslate2 models' configs do not. One transcription runs at a time
per worker; CTranslate2 reads the weights into each worker's memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.backends.entry import BackendEntry, Found, Kind, Sizing, SizingInputs
from engine.memory import COMPUTE_RESERVE, folder_bytes
from protocol.errors import ModelLoadError

__all__ = ["WhisperEntry", "check_whisper_folder"]


def _is_whisper_config(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "suppress_ids" in config and "lang_ids" in config


def check_whisper_folder(path: str) -> Path:
    """Validate a Whisper folder before CTranslate2 sees it; raise ModelLoadError."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(path, "not_whisper", "a Whisper model is a folder with model.bin")
    if not (folder / "model.bin").is_file():
        raise ModelLoadError(path, "not_whisper", "the folder has no model.bin")
    if not _is_whisper_config(folder):
        raise ModelLoadError(
            path, "config", "config.json does not describe a Whisper model (suppress_ids, lang_ids)"
        )
    if not any(
        (folder / name).is_file()
        for name in ("tokenizer.json", "vocabulary.txt", "vocabulary.json")
    ):
        raise ModelLoadError(path, "tokenizer", "the folder has no tokenizer.json or vocabulary")
    return folder


class WhisperEntry(BackendEntry):
    name = "whisper"
    kinds = frozenset({Kind.ASR})
    layout = "a CTranslate2 Whisper folder (model.bin, config.json)"
    package = "faster_whisper"
    install = "'ferrousforge[voice]'"
    module = "engine.backends.whisper"
    cls = "WhisperBackend"

    def claims(self, path: str) -> bool:
        folder = Path(path)
        return (folder / "model.bin").is_file() and _is_whisper_config(folder)

    def inspect(self, path: str) -> Found:
        check_whisper_folder(path)
        return Found(path, self.name, frozenset({Kind.ASR}))

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        # int8 weights take at most what the stored (fp16) ones do, in each worker.
        return Sizing(1, inputs.workers * (folder_bytes(found.path) + 2 * COMPUTE_RESERVE))
