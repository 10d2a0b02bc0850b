"""ONNX models for the onnxruntime backend: converters and deterministic test models.

Each submodule is imported explicitly (for example
:mod:`engine.onnx.tinydecoder`, which writes one tiny Llama decoder both as
ONNX and as GGUF from the same weights). Nothing is re-exported here, so
importing the package stays cheap (no onnx or tokenizers import) and
``python -m engine.onnx.<module>`` runs without runpy's double-import warning.
"""

from __future__ import annotations

__all__: list[str] = []
