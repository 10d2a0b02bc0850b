"""Registry entries of image models: classifiers, and image-text embedders (CLIP).

An image classifier is a folder holding ``model.onnx`` (images in, a score
per label out), ``preprocessor_config.json`` (how an image becomes the
graph's input: :class:`engine.images.Preprocess`) and ``config.json`` whose
``id2label`` names the outputs, as image classifiers exported for
onnxruntime ship. It is the ``onnx`` backend to a user and takes the same
``[onnx]`` options; the store's catalog writes these files for a classifier
that ships as a bare graph (``open-nsfw``).

A CLIP-style embedder is two graphs in one folder, as ONNX exports of CLIP
ship them: a text model (token ids and an attention mask in, ``text_embeds``
out) and a vision model (``pixel_values`` in, ``image_embeds`` out), each
with its projection into the shared space, beside ``tokenizer.json``,
``preprocessor_config.json`` and ``config.json``. The graphs are
``text_model.onnx`` and ``vision_model.onnx`` (in ``onnx/`` or at the top, as
exporters write them) or open_clip's ``textual.onnx`` and ``visual.onnx``
(:func:`clip_graphs`).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.backends.entry import BackendEntry, Found, Kind, Sizing, SizingInputs
from engine.backends.onnx_entry import OnnxOptions
from engine.memory import COMPUTE_RESERVE, folder_bytes
from protocol.errors import ModelLoadError

__all__ = [
    "PREPROCESSOR",
    "OnnxClipEntry",
    "OnnxImageClassifierEntry",
    "clip_graphs",
    "read_labels",
]

PREPROCESSOR = "preprocessor_config.json"


def read_labels(folder: Path) -> list[str]:
    """The label of each output, in order, from ``config.json``'s ``id2label``."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        raw = config["id2label"]
        labels = {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            str(folder), "config", f"config.json needs id2label (label by output index): {exc}"
        ) from None
    if not labels or sorted(labels) != list(range(len(labels))):
        raise ModelLoadError(str(folder), "config", "id2label must number outputs 0..n-1")
    return [labels[i] for i in range(len(labels))]


_CLIP_NAMES = (
    ("onnx/text_model.onnx", "onnx/vision_model.onnx"),
    ("text_model.onnx", "vision_model.onnx"),
    ("textual.onnx", "visual.onnx"),
)


def clip_graphs(folder: Path) -> tuple[Path, Path] | None:
    """The text and vision graphs of a CLIP-style folder, or None when it is not one."""
    for text, vision in _CLIP_NAMES:
        if (folder / text).is_file() and (folder / vision).is_file():
            return folder / text, folder / vision
    return None


class OnnxClipEntry(BackendEntry):
    name = "onnx"
    kinds = frozenset({Kind.IMAGE_EMBED, Kind.EMBED})
    layout = "a folder with text and vision ONNX graphs (CLIP)"
    package = "onnxruntime"
    options = OnnxOptions
    module = "engine.backends.onnxclip"
    cls = "OnnxClipEmbedder"

    def claims(self, path: str) -> bool:
        return clip_graphs(Path(path)) is not None

    def inspect(self, path: str) -> Found:
        from engine.images import read_preprocess

        folder = Path(path)
        if clip_graphs(folder) is None:
            names = ", ".join(" + ".join(pair) for pair in _CLIP_NAMES)
            raise ModelLoadError(path, "not_onnx", f"a CLIP folder holds {names}")
        if not (folder / "tokenizer.json").is_file():
            raise ModelLoadError(path, "tokenizer", "the folder has no tokenizer.json")
        read_preprocess(folder)
        return Found(path, self.name, frozenset({Kind.IMAGE_EMBED, Kind.EMBED}))

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        per_worker = folder_bytes(found.path) + 4 * COMPUTE_RESERVE
        return Sizing(1, inputs.workers * per_worker)


class OnnxImageClassifierEntry(BackendEntry):
    name = "onnx"
    kinds = frozenset({Kind.IMAGE_CLASSIFY})
    layout = "a folder with model.onnx and preprocessor_config.json"
    package = "onnxruntime"
    options = OnnxOptions
    module = "engine.backends.onnximage"
    cls = "OnnxImageClassifier"

    def claims(self, path: str) -> bool:
        folder = Path(path)
        return (folder / "model.onnx").is_file() and (folder / PREPROCESSOR).is_file()

    def inspect(self, path: str) -> Found:
        from engine.images import read_preprocess

        folder = Path(path)
        if not (folder / "model.onnx").is_file():
            raise ModelLoadError(path, "not_onnx", "the folder has no model.onnx")
        read_preprocess(folder)
        read_labels(folder)
        return Found(path, self.name, frozenset({Kind.IMAGE_CLASSIFY}))

    def size(self, found: Found, inputs: SizingInputs) -> Sizing:
        # The graph in each worker, and activations for a batch of images.
        per_worker = folder_bytes(found.path) + 4 * COMPUTE_RESERVE
        return Sizing(1, inputs.workers * per_worker)
