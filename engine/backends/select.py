"""Pick a backend for a model file: a tiny selector, imported lazily.

Backends pull in large native libraries, so a backend module is imported only
when a model needs it, and a missing optional backend is reported as a typed
error rather than an ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from engine.backends.base import Backend
from engine.gguf_header import KNOWN_ARCHITECTURES, GGUFHeader, read_gguf_header
from protocol.errors import BadRequest, ModelLoadError

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_class",
    "check_model_file",
    "check_onnx_folder",
    "choose_backend",
]

# name -> (module, class, python package it needs)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "llama_cpp": ("engine.backends.llamacpp", "LlamaCppBackend", "llama_cpp"),
    "ctransformers": ("engine.backends.ctrans", "CTransformersBackend", "ctransformers"),
    "onnx": ("engine.backends.onnxrt", "OnnxBackend", "onnxruntime"),
}
DEFAULT_GGUF_BACKEND = "llama_cpp"

# What each backend can run, checked before any native code sees the file.
ARCHITECTURES: dict[str, frozenset[str]] = {
    "llama_cpp": KNOWN_ARCHITECTURES,
    "ctransformers": frozenset({"llama"}),
}


def available_backends() -> list[str]:
    """Backends whose runtime package is installed."""
    return [n for n, (_, _, pkg) in BACKENDS.items() if importlib.util.find_spec(pkg) is not None]


def choose_backend(path: str, requested: str | None = None) -> str:
    """The backend name for ``path``: ``requested`` if given, else by file type.

    A folder holding ``model.onnx`` is an ONNX model; anything else is taken
    for a GGUF file (and checked as one).
    """
    if requested:
        if requested not in BACKENDS:
            raise BadRequest(f"unknown backend {requested!r}; known: {', '.join(BACKENDS)}")
        return requested
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.onnx")):
        return "onnx"
    return DEFAULT_GGUF_BACKEND


def backend_class(name: str) -> type[Backend]:
    module, cls, pkg = BACKENDS[name]
    if importlib.util.find_spec(pkg) is None:
        raise BadRequest(f"backend {name!r} is not installed (pip install {pkg})")
    found: type[Backend] = getattr(importlib.import_module(module), cls)
    return found


def check_model_file(path: str, backend: str) -> GGUFHeader:
    """Validate ``path`` for ``backend`` without loading it; raise ModelLoadError.

    Cheap (header only), so the gateway runs it before asking workers to load,
    and backends run it again before handing the file to native code.
    """
    header = read_gguf_header(path)
    archs = ARCHITECTURES.get(backend, frozenset())
    if header.architecture not in archs:
        raise ModelLoadError(
            path,
            "unsupported_architecture",
            f"architecture {header.architecture!r} is not supported by the {backend} backend",
        )
    if backend == "ctransformers" and "tokenizer.ggml.scores" not in header.array_lengths:
        raise ModelLoadError(
            path, "unsupported_vocabulary", "ctransformers needs tokenizer.ggml.scores"
        )
    return header


def check_onnx_folder(path: str) -> Path:
    """Validate a model folder before it reaches onnxruntime; raise ModelLoadError."""
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(path, "missing", "no such folder")
    if not folder.is_dir():
        raise ModelLoadError(path, "not_onnx", "an ONNX model is a folder with model.onnx")
    if not (folder / "model.onnx").is_file():
        raise ModelLoadError(path, "not_onnx", "the folder has no model.onnx")
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(path, "tokenizer", "the folder has no tokenizer.json")
    return folder
