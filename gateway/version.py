"""The project's version, from the installed package's metadata (one source: pyproject)."""

from __future__ import annotations

import importlib.metadata

__all__ = ["__version__"]


def _version() -> str:
    try:
        return importlib.metadata.version("ferrousforge")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0.1.0"


__version__ = _version()
