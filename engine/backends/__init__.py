"""Model backends, the interfaces they implement per kind of job, and the registry that picks one."""

from __future__ import annotations

from engine.backends.base import (
    Backend,
    Embedder,
    LoadParams,
    TextGenerator,
    embedder_of,
    generator_of,
)
from engine.backends.entry import BackendEntry, Found, Kind
from engine.backends.registry import available_backends, backend_names, find_entry

__all__ = [
    "Backend",
    "BackendEntry",
    "Embedder",
    "Found",
    "Kind",
    "LoadParams",
    "TextGenerator",
    "available_backends",
    "backend_names",
    "embedder_of",
    "find_entry",
    "generator_of",
]
