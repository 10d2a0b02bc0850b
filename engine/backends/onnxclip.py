"""Image and text embeddings in one space (CLIP and its kin) through onnxruntime.

Two graphs (:func:`engine.backends.image_entry.clip_graphs`): texts are
tokenized with the folder's ``tokenizer.json``, padded to the longest of a
batch, cut at the text model's length (``text_config.max_position_embeddings``
in ``config.json``, 77 by default, or refused with ``truncate=False``) and run
through the text graph; images are decoded and prepared as the folder's
``preprocessor_config.json`` says (:mod:`engine.images`) and run through the
vision graph. Each graph's projected output (``text_embeds`` /
``image_embeds``, else its first output) is scaled to unit length, so a dot
product between any two vectors, text or image, is their cosine similarity.
A job runs one batch of :data:`BATCH` inputs per worker step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from engine.backends.base import EmbedJob, ImageEmbedder, LoadParams
from engine.backends.image_entry import clip_graphs
from engine.backends.onnxsession import open_session, read_json
from engine.images import graph_layout, prepare_all, read_preprocess
from protocol.errors import BadRequest, ModelLoadError

__all__ = ["BATCH", "MAX_IMAGES", "OnnxClipEmbedder"]

BATCH = 8
MAX_IMAGES = 64


def _output(session: ort.InferenceSession, name: str) -> str:
    names = [o.name for o in session.get_outputs()]
    return name if name in names else names[0]


def _unit(x: np.ndarray) -> list[list[float]]:
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    out: list[list[float]] = (x / np.maximum(norm, 1e-12)).tolist()
    return out


class OnnxClipEmbedder(ImageEmbedder):
    name = "onnx"

    def __init__(self, folder: Path, text: ort.InferenceSession, vision: ort.InferenceSession):
        self._text, self._vision = text, vision
        self.providers = list(vision.get_providers())
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        config = read_json(folder / "config.json")
        text_config = config.get("text_config") or {}
        self.n_ctx = int(text_config.get("max_position_embeddings") or 77)
        padding = self._tok.padding or {}
        self._pad = int(padding.get("pad_id", 0)) if isinstance(padding, dict) else 0
        self._text_inputs = {i.name for i in text.get_inputs()}
        if "input_ids" not in self._text_inputs:
            raise ModelLoadError(str(folder), "layout", "the text graph takes no input_ids")
        self._text_out = _output(text, "text_embeds")
        self._cfg = read_preprocess(folder)
        inp = vision.get_inputs()[0]
        self._pixels = inp.name
        self._layout = graph_layout(list(inp.shape), self._cfg, str(folder))
        self._image_out = _output(vision, "image_embeds")

    @classmethod
    def load(cls, path: str, params: LoadParams) -> OnnxClipEmbedder:
        folder = Path(path)
        graphs = clip_graphs(folder)
        if graphs is None:
            raise ModelLoadError(path, "not_onnx", "not a CLIP folder (text and vision graphs)")
        return cls(folder, open_session(graphs[0], params), open_session(graphs[1], params))

    def free(self) -> None:
        pass  # the sessions go with the object

    # -- texts ------------------------------------------------------------------------

    def embed_job(self, texts: Sequence[str], truncate: bool) -> EmbedJob:
        ids = []
        for i, text in enumerate(texts):
            if not text:
                raise BadRequest(f"input {i} is empty")
            tokens = self._tok.encode(text).ids
            if len(tokens) > self.n_ctx:
                if not truncate:
                    raise BadRequest(
                        f"input {i} has {len(tokens)} tokens; this model reads {self.n_ctx}"
                    )
                tokens = tokens[: self.n_ctx - 1] + tokens[-1:]  # keep the end marker
            ids.append(tokens)
        return self._texts(ids)

    def _texts(self, ids: list[list[int]]) -> EmbedJob:
        vectors: list[list[float]] = []
        for start in range(0, len(ids), BATCH):
            part = ids[start : start + BATCH]
            width = max(map(len, part))
            batch = np.full((len(part), width), self._pad, np.int64)
            mask = np.zeros((len(part), width), np.int64)
            for row, tokens in enumerate(part):
                batch[row, : len(tokens)] = tokens
                mask[row, : len(tokens)] = 1
            feed = {"input_ids": batch}
            if "attention_mask" in self._text_inputs:
                feed["attention_mask"] = mask
            vectors += _unit(self._text.run([self._text_out], feed)[0])
            yield
        return vectors, sum(map(len, ids))

    # -- images -----------------------------------------------------------------------

    def embed_images_job(self, images: Sequence[bytes]) -> EmbedJob:
        if len(images) > MAX_IMAGES:
            raise BadRequest(f"{len(images)} images; one request takes at most {MAX_IMAGES}")
        return self._images(list(images))

    def _images(self, images: list[bytes]) -> EmbedJob:
        # Decoded a batch at a time: a step's work (and memory) is BATCH images'.
        vectors: list[list[float]] = []
        for start in range(0, len(images), BATCH):
            tensors = prepare_all(images[start : start + BATCH], self._cfg, self._layout, start)
            yield  # decoding was this step's work
            batch = np.stack(tensors)
            vectors += _unit(self._vision.run([self._image_out], {self._pixels: batch})[0])
            if start + BATCH < len(images):
                yield
        return vectors, 0
