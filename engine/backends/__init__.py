"""Model backends and the selector that picks one for a file."""

from __future__ import annotations

from engine.backends.base import Backend, LoadParams
from engine.backends.select import available_backends, backend_class, choose_backend

__all__ = ["Backend", "LoadParams", "available_backends", "backend_class", "choose_backend"]
