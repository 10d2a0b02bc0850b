"""The layers a create adds beside its model: a model blob named by digest, a vision
model's projector (a second FROM) and LoRA adapters (ADAPTER).

Each is a GGUF file given as a blob already in the store (``sha256:<hex>``,
uploaded as Ollama's clients do), a path or a source URL (fetched by the
manager as FROM is), and checked against the text model it goes with
(:mod:`engine.store.adapters`) before the create commits anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.gguf_header import read_gguf_header
from engine.store.adapters import BLOB_REF, PROJECTOR_FILE, check_projector
from engine.store.errors import StoreError
from engine.store.manifest import Format, Layer
from engine.store.progress import PullEvent, PullListener
from engine.store.sources import Source
from engine.store.sources import parse_source as _parse_source
from engine.store.store import ModelStore
from protocol.errors import FerrousError

__all__ = ["Extras", "blob_model", "gguf_layer", "text_model_of", "with_projector"]

Fetch = Callable[
    [Source, PullListener, None], Awaitable[tuple[dict[str, Path], list[Layer], Format]]
]


@dataclass(frozen=True)
class Extras:
    """Where a create's extra layers go (the store) and how sources are fetched."""

    store: ModelStore
    fetch: Fetch


def blob_model(store: ModelStore, ref: str) -> Layer:
    """FROM ``sha256:<hex>``: a GGUF model blob already in ``store`` (uploaded)."""
    blob = BLOB_REF.fullmatch(ref)
    assert blob is not None
    digest = f"sha256:{blob.group(1)}"
    path = store.blob_path(digest)
    if not store.has_blob(digest):
        raise StoreError("not_found", f"FROM {ref}: no such blob in the store")
    try:
        header = read_gguf_header(str(path))
    except FerrousError as exc:
        raise StoreError("invalid", f"FROM {ref}: {exc.message}") from None
    if header.metadata.get("general.type") == "adapter":
        raise StoreError("invalid", f"FROM {ref}: a LoRA adapter, not a model (ADAPTER)")
    if header.architecture == "clip":
        raise StoreError("invalid", f"FROM {ref}: a projector: give it as a second FROM")
    return Layer(digest, path.stat().st_size, "model.gguf")


def text_model_of(
    store: ModelStore, files: list[Layer], fmt: Format, staged: dict[str, Path]
) -> Path | None:
    """The GGUF text model among ``files`` (beside a projector), else None."""
    models = [f for f in files if f.path != PROJECTOR_FILE]
    if fmt != "gguf" or len(models) != 1:
        return None
    return staged.get(models[0].digest) or store.blob_path(models[0].digest)


async def gguf_layer(
    extras: Extras,
    directive: str,
    text: str,
    check: Callable[[Path, Path | None, str], None],
    base: Path | None,
    staged: dict[str, Path],
    base_dir: Path | None,
    emit: PullListener,
) -> Layer:
    """ADAPTER's or a projector FROM's file as a layer (a blob of the store, a path or a
    source), its bytes staged in ``staged``, passed by ``check`` against the text model
    at ``base``."""
    store = extras.store
    blob = BLOB_REF.fullmatch(text)
    if blob is not None:
        digest = f"sha256:{blob.group(1)}"
        path = store.blob_path(digest)
        if not store.has_blob(digest):
            raise StoreError("not_found", f"{directive} {text}: no such blob in the store")
        await asyncio.to_thread(check, path, base, text)
        name = "adapter.gguf" if directive == "ADAPTER" else PROJECTOR_FILE
        return Layer(digest, path.stat().st_size, name)
    src = _parse_source(text, base=base_dir)
    emit(PullEvent(f"importing {src.shown}"))
    more, layers, fmt = await extras.fetch(src, emit, None)
    staged.update(more)
    if fmt != "gguf" or len(layers) != 1:
        raise StoreError("invalid", f"{directive} {src.shown}: expected one GGUF file")
    path = more.get(layers[0].digest) or store.blob_path(layers[0].digest)
    await asyncio.to_thread(check, path, base, src.shown)
    return layers[0]


async def with_projector(
    extras: Extras,
    text: str,
    files: Sequence[Layer],
    fmt: Format,
    staged: dict[str, Path],
    base_dir: Path | None,
    emit: PullListener,
) -> list[Layer]:
    """``files`` (one GGUF text model) and the projector a second FROM names: the folder
    of a vision language model (:func:`engine.backends.gguf_entry.vision_pair`)."""
    if any(f.path == PROJECTOR_FILE for f in files):
        raise StoreError("invalid", "FROM is a vision model already: it has a projector")
    base = text_model_of(extras.store, list(files), fmt, staged)
    layer = await gguf_layer(extras, "FROM", text, check_projector, base, staged, base_dir, emit)
    [model] = files
    name = model.path if model.path.lower().endswith(".gguf") else model.path + ".gguf"
    return [
        Layer(model.digest, model.size, name),
        Layer(layer.digest, layer.size, PROJECTOR_FILE),
    ]
