"""Turning a staged GGUF into another model file: llama.cpp quantization and the ONNX graph.

Both run in a child process (:mod:`engine.quantize`): each holds a whole
model in memory for seconds to minutes, which is no work for the gateway's
threads, and a crash in native code or a cancel must end there, with the
child killed and its partial output removed. What they write is staged in
the store like any download (:meth:`ModelStore.stage_file`), so the caller
commits it or throws it away with the rest of its staging.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.quantize import (
    ONNX_Q4,
    check_quantizable,
    convert_in_subprocess,
    quant_type,
    quantize_in_subprocess,
)
from engine.store.errors import StoreError, os_error
from engine.store.manifest import Format, Layer
from engine.store.progress import PullEvent, PullListener
from engine.store.store import ModelStore, hash_file
from protocol.errors import BadRequest, FerrousError

__all__ = ["check_quant_type", "converted", "quantize_layers", "stage_folder", "to_onnx"]


def stage_folder(
    store: ModelStore, path: Path, fmt: Format = "onnx"
) -> tuple[dict[str, Path], list[Layer], Format]:
    """Stage every file of a model folder (each becomes a blob; equal files one)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    staged: dict[str, Path] = {}
    layers: list[Layer] = []
    for p in files:
        tmp, digest, size = store.stage_file(p)
        if f"sha256:{digest}" in staged:
            tmp.unlink(missing_ok=True)
        else:
            staged[f"sha256:{digest}"] = tmp
        layers.append(Layer(f"sha256:{digest}", size, p.relative_to(path).as_posix()))
    return staged, layers, fmt


def converted(
    store: ModelStore, convert: Callable[[Path], object]
) -> tuple[dict[str, Path], list[Layer], Format]:
    """Run an in-process converter (a small encoder's) into a scratch folder, then
    stage what it wrote."""
    scratch = Path(tempfile.mkdtemp(dir=store.tmp, prefix=f"{os.getpid()}-convert-"))
    try:
        out = scratch / "model"
        try:
            convert(out)
        except OSError as exc:
            raise os_error(exc, "converting the model") from None
        return stage_folder(store, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def to_onnx(
    store: ModelStore, gguf: Path, *, q4: bool, fused: bool
) -> tuple[dict[str, Path], list[Layer], Format]:
    """The GGUF at ``gguf`` converted to an ONNX folder, staged; StoreError ``invalid``
    with the converter's reason when it cannot be."""
    scratch = Path(tempfile.mkdtemp(dir=store.tmp, prefix=f"{os.getpid()}-convert-"))
    try:
        out = scratch / "model"
        try:
            await convert_in_subprocess(gguf, out, q4=q4, fused=fused)
        except FerrousError as exc:
            raise StoreError("invalid", f"cannot convert to ONNX: {exc.message}") from None
        try:
            return await asyncio.to_thread(stage_folder, store, out)
        except OSError as exc:
            raise os_error(exc, "converting the model") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)


def check_quant_type(qtype: str) -> str:
    """``qtype`` spelled as llama.cpp spells it; StoreError ``invalid`` for an unknown
    type (checked before anything is fetched)."""
    try:
        return quant_type(qtype)
    except BadRequest as exc:
        raise StoreError("invalid", exc.message) from None


async def quantize_layers(
    store: ModelStore,
    files: list[Layer],
    fmt: Format,
    staged: dict[str, Path],
    qtype: str,
    emit: PullListener,
) -> tuple[list[Layer], dict[str, Path], Format]:
    """The model's one GGUF replaced by its quantization to ``qtype``; with ``onnx-q4``,
    by the ONNX converter's 4-bit graph (for the ONNX backend). A GGUF staged only
    to be quantized is removed from the staging once replaced."""
    qtype = check_quant_type(qtype)
    if fmt != "gguf" or len(files) != 1:
        raise StoreError("invalid", "quantize takes a GGUF model (one file)")
    layer = files[0]
    src = staged.get(layer.digest) or store.blob_path(layer.digest)
    if qtype == ONNX_Q4:
        emit(PullEvent("converting to ONNX, 4-bit"))
        more, layers, _ = await to_onnx(store, src, q4=True, fused=True)
        _drop(staged, layer.digest)
        return layers, {**staged, **more}, "onnx"
    try:
        was = await asyncio.to_thread(check_quantizable, src)
    except BadRequest as exc:
        raise StoreError("invalid", exc.message) from None
    status = f"quantizing {was} to {qtype}"
    emit(PullEvent(status))
    out = store.temp_path("quantize-")

    def tensors(done: int, total: int) -> None:
        emit(PullEvent(status, total=total, completed=done))

    try:
        await quantize_in_subprocess(src, out, qtype, progress=tensors)
        digest, size = await asyncio.to_thread(hash_file, out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    _drop(staged, layer.digest)
    staged[f"sha256:{digest}"] = out
    stem = re.sub(r"\.gguf$", "", layer.path, flags=re.IGNORECASE)
    return [Layer(f"sha256:{digest}", size, f"{stem}.{qtype}.gguf")], staged, "gguf"


def _drop(staged: dict[str, Path], digest: str) -> None:
    old = staged.pop(digest, None)
    if old is not None:
        old.unlink(missing_ok=True)  # imported only to be converted
