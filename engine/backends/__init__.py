"""Model backends, the interfaces they implement per job, and the selector that picks one."""

from __future__ import annotations

from engine.backends.base import (
    Backend,
    Embedder,
    LoadParams,
    TextGenerator,
    embedder_of,
    generator_of,
)
from engine.backends.select import available_backends, backend_class, choose_backend

__all__ = [
    "Backend",
    "Embedder",
    "LoadParams",
    "TextGenerator",
    "available_backends",
    "backend_class",
    "choose_backend",
    "embedder_of",
    "generator_of",
]
