"""Embeddings from a converted BERT encoder folder (``pooling.json``), through onnxruntime.

The registry gives a folder holding ``pooling.json`` (written by
:func:`engine.onnx.bert_convert.convert_bert`) to this backend rather than to
the decoder (:mod:`engine.backends.onnx_entry`). An encoder has no
LM head, so it is an :class:`~engine.backends.base.Embedder` only: the worker
refuses generation requests for it before they reach the backend.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.backends.base import Embedder, EmbedJob, LoadParams
from engine.backends.onnx_entry import OnnxOptions, check_onnx_folder
from engine.backends.onnxsession import providers_for
from engine.onnx.encoder import OnnxEncoder
from protocol.errors import BadRequest

__all__ = ["OnnxEncoderBackend"]


class OnnxEncoderBackend(Embedder):
    """A BERT-style ONNX encoder run by :class:`~engine.onnx.encoder.OnnxEncoder`.

    :meth:`embed_job` runs the encoder one batch per step of the worker loop,
    so running streams on the same worker keep moving.
    """

    name = "onnx"

    def __init__(self, encoder: OnnxEncoder) -> None:
        self._enc = encoder
        self.n_ctx = encoder.max_length
        self.providers = encoder.providers

    @classmethod
    def load(cls, path: str, params: LoadParams) -> OnnxEncoderBackend:
        opts = params.options if isinstance(params.options, OnnxOptions) else OnnxOptions()
        folder = check_onnx_folder(path)
        providers = providers_for(opts, str(folder))
        return cls(
            OnnxEncoder(
                folder, threads=params.n_threads, providers=providers, spinning=opts.spinning
            )
        )

    def free(self) -> None:
        pass  # the session goes with the object

    def embed_job(self, texts: Sequence[str], truncate: bool) -> EmbedJob:
        for i, text in enumerate(texts):
            if not text:
                raise BadRequest(f"input {i} is empty")
        tokens = self._enc.tokenize(texts, truncate=truncate)  # BadRequest when too long
        batch = max(1, self._enc.batch_size)

        def job() -> EmbedJob:
            vectors: list[list[float]] = []
            for start in range(0, len(texts), batch):
                part = self._enc.embed(list(texts[start : start + batch]), truncate=truncate)
                vectors.extend(part.tolist())
                yield
            return vectors, sum(len(t) for t in tokens)

        return job()
