"""The model store: content-addressed blobs, manifests by name:tag, pulls and imports."""

from __future__ import annotations
