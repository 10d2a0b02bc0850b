"""Image classification through onnxruntime: a folder's graph, its labels and its preparation.

A job decodes every image first (one step: nothing reaches the graph until
all of a request's images are known to be readable and within bounds), then
runs the graph on :data:`BATCH` images per step, so a generation stream on
the same worker waits at most one batch. Scores are probabilities: the
graph's own when its output comes out of a ``Softmax`` (or ``Sigmoid``),
else a softmax of its logits (``config.json``'s ``problem_type`` of
``multi_label_classification`` asks for a sigmoid per label instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.backends.base import ClassifyJob, ImageClassifier, LoadParams
from engine.backends.image_entry import read_labels
from engine.backends.onnxsession import open_session, read_json
from engine.images import graph_layout, prepare_all, read_preprocess
from engine.requests import Label
from protocol.errors import BadRequest

__all__ = ["BATCH", "MAX_IMAGES", "OnnxImageClassifier"]

BATCH = 8  # images per graph run (per worker step)
MAX_IMAGES = 64  # images per request


def _output_activation(path: Path) -> str:
    """The op that makes the graph's first output ("Softmax", "Sigmoid", ...), weights unread."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    out = graph.output[0].name
    for node in graph.node:
        if out in node.output:
            return str(node.op_type)
    return ""


class OnnxImageClassifier(ImageClassifier):
    name = "onnx"

    def __init__(self, folder: Path, session: ort.InferenceSession) -> None:
        self._session = session
        self.providers = list(session.get_providers())
        self._cfg = read_preprocess(folder)
        self.labels = read_labels(folder)
        self.n_ctx = 0
        inp = session.get_inputs()[0]
        self._input = inp.name
        self._layout = graph_layout(list(inp.shape), self._cfg, str(folder))
        act = _output_activation(folder / "model.onnx")
        config = read_json(folder / "config.json")
        if act in ("Softmax", "Sigmoid"):
            self._scores = "as-is"
        elif config.get("problem_type") == "multi_label_classification":
            self._scores = "sigmoid"
        else:
            self._scores = "softmax"

    @classmethod
    def load(cls, path: str, params: LoadParams) -> OnnxImageClassifier:
        folder = Path(path)
        session = open_session(folder / "model.onnx", params)
        return cls(folder, session)

    def free(self) -> None:
        pass  # the session goes with the object

    def classify_job(self, images: Sequence[bytes], top_k: int) -> ClassifyJob:
        if not images:
            raise BadRequest("no images to classify")
        if len(images) > MAX_IMAGES:
            raise BadRequest(f"{len(images)} images; one request takes at most {MAX_IMAGES}")
        if top_k < 1:
            raise BadRequest("top_k must be 1 or more")
        return self._job(list(images), min(top_k, len(self.labels)))

    def _job(self, images: list[bytes], top_k: int) -> ClassifyJob:
        # Decoded a batch at a time: a step's work (and memory) is BATCH images'.
        out: list[list[Label]] = []
        for start in range(0, len(images), BATCH):
            tensors = prepare_all(images[start : start + BATCH], self._cfg, self._layout, start)
            yield  # decoding was this step's work
            scores = self.scores(np.stack(tensors))
            for row in scores:
                best = np.argsort(-row, kind="stable")[:top_k]
                out.append([Label(self.labels[j], round(float(row[j]), 6)) for j in best])
            if start + BATCH < len(images):
                yield
        return out

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of each label for a prepared batch (N images)."""
        raw = np.asarray(self._session.run(None, {self._input: batch})[0], dtype=np.float64)
        raw = raw.reshape(len(batch), -1)
        if raw.shape[1] != len(self.labels):
            raise BadRequest(f"the graph gave {raw.shape[1]} scores for {len(self.labels)} labels")
        if self._scores == "sigmoid":
            return np.asarray(1 / (1 + np.exp(-raw)))
        if self._scores == "softmax":
            z = np.exp(raw - raw.max(axis=1, keepdims=True))
            return np.asarray(z / z.sum(axis=1, keepdims=True))
        return raw
