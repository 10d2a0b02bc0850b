"""The backends the engine knows, and which one takes a model path.

Entries are tried in order; the first whose layout claims the path takes it
(more specific layouts first: an ONNX encoder folder before any ONNX folder,
folders before the GGUF entries, which take any file). A request may name a
backend; then only entries of that name are tried, and when none claims the
path, the last of them inspects it, so the error says what that backend
expected (``not_onnx``, ``not_gguf``, ...).

Backend modules import large native libraries, so nothing here imports one:
an entry names its module and the package it needs, and a missing optional
backend is a typed error, not an ImportError.
"""

from __future__ import annotations

from engine.backends.diffusion_entry import DiffusionEntry
from engine.backends.entry import BackendEntry
from engine.backends.gguf_entry import CTransformersEntry, LlamaCppEntry
from engine.backends.image_entry import OnnxClipEntry, OnnxImageClassifierEntry
from engine.backends.onnx_entry import OnnxDecoderEntry, OnnxEncoderEntry
from engine.backends.tts_entry import HibariEntry
from engine.backends.whisper_entry import WhisperEntry
from protocol.errors import BadRequest

__all__ = ["REGISTRY", "available_backends", "backend_names", "find_entry"]

REGISTRY: tuple[BackendEntry, ...] = (
    WhisperEntry(),
    HibariEntry(),
    DiffusionEntry(),
    OnnxClipEntry(),
    OnnxImageClassifierEntry(),
    OnnxEncoderEntry(),
    OnnxDecoderEntry(),
    LlamaCppEntry(),
    CTransformersEntry(),
)


def backend_names() -> list[str]:
    """Public backend names, each once, in registry order."""
    return list(dict.fromkeys(e.name for e in REGISTRY))


def available_backends() -> list[str]:
    """Names of backends whose runtime package is installed."""
    return list(dict.fromkeys(e.name for e in REGISTRY if e.installed()))


def find_entry(path: str, requested: str | None = None) -> BackendEntry:
    """The entry that takes ``path``: the first that claims it (of ``requested``'s, if named)."""
    if requested:
        candidates = [e for e in REGISTRY if e.name == requested]
        if not candidates:
            raise BadRequest(f"unknown backend {requested!r}; known: {', '.join(backend_names())}")
    else:
        candidates = [e for e in REGISTRY if e.default]
    for entry in candidates:
        if entry.claims(path):
            return entry
    return candidates[-1]
