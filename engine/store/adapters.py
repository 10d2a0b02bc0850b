"""LoRA adapters and vision projectors in the store: what a Modelfile's ``ADAPTER`` and
second ``FROM`` may name, and the checks that such a file is one, for its model.

``ADAPTER`` takes a GGUF LoRA as llama.cpp's converter writes them
(``general.type = adapter``, ``adapter.type = lora``): a path (beside the
Modelfile), a source URL as FROM takes, or ``sha256:<hex>`` naming a blob
already in the store (uploaded with ``POST /api/blobs/sha256:<hex>``, as
Ollama's clients do). The adapter becomes a blob of the new model's manifest
(``adapters``); a model created FROM it keeps its adapters and may add one.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.gguf_header import read_gguf_header
from engine.store.errors import StoreError
from protocol.errors import FerrousError

__all__ = [
    "BLOB_REF",
    "MAX_ADAPTERS",
    "PROJECTOR_FILE",
    "check_adapter",
    "check_projector",
    "is_blob_ref",
]

BLOB_REF = re.compile(r"sha256[:-]([0-9a-f]{64})")
MAX_ADAPTERS = 4  # adapters one model may stack
PROJECTOR_FILE = "projector.gguf"  # a vision model's projector, beside its text model


def is_blob_ref(text: str) -> bool:
    return BLOB_REF.fullmatch(text) is not None


def check_adapter(path: Path, base: Path | None, shown: str) -> None:
    """StoreError ``invalid`` unless ``path`` is a GGUF LoRA for the architecture of the
    GGUF model at ``base`` (None: a base that is not a GGUF, which takes no adapters)."""
    if base is None:
        raise StoreError("invalid", "ADAPTER takes a GGUF model in FROM (LoRA adapters are GGUF)")
    try:
        header = read_gguf_header(str(path))
        base_arch = read_gguf_header(str(base)).architecture
    except (FerrousError, OSError):
        raise StoreError("invalid", f"ADAPTER {shown}: not a GGUF file") from None
    meta = header.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise StoreError(
            "invalid", f"ADAPTER {shown}: not a LoRA adapter (a GGUF with adapter.type lora)"
        )
    if header.architecture != base_arch:
        raise StoreError(
            "invalid",
            f"ADAPTER {shown}: made for {header.architecture!r} models; FROM is {base_arch!r}",
        )


def check_projector(path: Path, base: Path | None, shown: str) -> None:
    """StoreError ``invalid`` unless ``path`` is a multimodal projector (a GGUF of
    architecture ``clip``) for the GGUF text model at ``base``, whose embedding width
    its projection must produce."""
    if base is None:
        raise StoreError("invalid", "a projector goes with one GGUF text model in the first FROM")
    try:
        header = read_gguf_header(str(path))
        model = read_gguf_header(str(base))
    except (FerrousError, OSError):
        raise StoreError("invalid", f"FROM {shown}: not a GGUF file") from None
    if header.architecture != "clip":
        raise StoreError(
            "invalid", f"FROM {shown}: a second FROM is a vision projector (GGUF, clip)"
        )
    width = model.get_int(f"{model.architecture}.embedding_length")
    wanted = header.get_int("clip.vision.projection_dim")
    if width and wanted and width != wanted:
        raise StoreError(
            "invalid",
            f"FROM {shown}: the projector makes {wanted}-wide embeddings; the model takes {width}",
        )
