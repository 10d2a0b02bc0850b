"""Pick a backend for a model file: a tiny selector, imported lazily.

Backends pull in large native libraries, so a backend module is imported only
when a model needs it, and a missing optional backend is reported as a typed
error rather than an ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util

from engine.backends.base import Backend
from protocol.errors import BadRequest

__all__ = ["BACKENDS", "available_backends", "backend_class", "choose_backend"]

# name -> (module, class, python package it needs)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "llama_cpp": ("engine.backends.llamacpp", "LlamaCppBackend", "llama_cpp"),
    "ctransformers": ("engine.backends.ctrans", "CTransformersBackend", "ctransformers"),
}
DEFAULT_GGUF_BACKEND = "llama_cpp"


def available_backends() -> list[str]:
    """Backends whose runtime package is installed."""
    return [n for n, (_, _, pkg) in BACKENDS.items() if importlib.util.find_spec(pkg) is not None]


def choose_backend(path: str, requested: str | None = None) -> str:
    """The backend name for ``path``: ``requested`` if given, else by file type."""
    if requested:
        if requested not in BACKENDS:
            raise BadRequest(f"unknown backend {requested!r}; known: {', '.join(BACKENDS)}")
        return requested
    return DEFAULT_GGUF_BACKEND


def backend_class(name: str) -> type[Backend]:
    module, cls, pkg = BACKENDS[name]
    if importlib.util.find_spec(pkg) is None:
        raise BadRequest(f"backend {name!r} is not installed (pip install {pkg})")
    found: type[Backend] = getattr(importlib.import_module(module), cls)
    return found
