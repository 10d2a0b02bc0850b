"""ONNX models for the onnxruntime backends: graph builders, converters, runtimes, test models.

By job:

* :mod:`engine.onnx.graph` — the one graph builder every graph below uses;
* :mod:`engine.onnx.decoder`, :mod:`engine.onnx.fused`, :mod:`engine.onnx.quant`
  — the Llama decoder graphs (plain and fused) and their 4-bit projections;
* :mod:`engine.onnx.convert` — GGUF to an ONNX decoder folder;
* :mod:`engine.onnx.tinydecoder` — a tiny decoder written both as ONNX and as
  GGUF from the same weights, for tests;
* :mod:`engine.onnx.bert`, :mod:`engine.onnx.bert_convert`,
  :mod:`engine.onnx.encoder`, :mod:`engine.onnx.bert_reference` — BERT
  sentence-transformers folders, their conversion to an ONNX encoder, its
  runtime, and a numpy forward pass to check it against.

Each submodule is imported explicitly. Nothing is re-exported here, so
importing the package stays cheap (no onnx or tokenizers import) and
``python -m engine.onnx.<module>`` runs without runpy's double-import warning.
"""

from __future__ import annotations

__all__: list[str] = []
