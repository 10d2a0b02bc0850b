"""The FerrousForge gateway: HTTP and WebSocket front-end over the engine."""

from __future__ import annotations

__all__: list[str] = []
